#!/bin/sh
# FLARE 2024 Task 1 (GPU, torch). The organisers run `sh predict.sh` (dash) in /workspace.
set -eu
cd "$(dirname "$0")"
exec python3 -m flarebox predict -c config.toml -i "${INPUT_DIR:-/workspace/inputs}" -o "${OUTPUT_DIR:-/workspace/outputs}"
