#!/usr/bin/env bash
# Build the nnU-Net v2 reference environment: make_nnunet_env.sh [VENV_DIR] (default .venv-nnunet).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-.venv-nnunet}
start=$(date +%s)
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and pinned (the CPU wheel on disk); the constraint keeps every later step on it.
"$venv/bin/python" -m pip install -q torch==2.13.0
echo "torch==2.13.0" > "$venv/constraints.txt"
"$venv/bin/python" -m pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
"$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -r "$here/requirements-nnunet.txt"
"$venv/bin/python" -c "import nnunetv2.inference.predict_from_raw_data as p; print('nnU-Net', p.__name__, 'ok')"
echo "nnU-Net env in $venv: $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)"
