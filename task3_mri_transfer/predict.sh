#!/bin/sh
# FLARE 2024 Task 3 (GPU, torch). The organisers run `sh predict.sh` (dash) in /workspace.
# CONFIG=config_zero_shot.toml selects the zero-shot MIND-SSC model.
set -eu
cd "$(dirname "$0")"
exec python3 -m flarebox predict -c "${CONFIG:-config.toml}" -i "${INPUT_DIR:-/workspace/inputs}" -o "${OUTPUT_DIR:-/workspace/outputs}"
