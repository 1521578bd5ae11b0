#!/usr/bin/env bash
# Build (or bring up to date) the nnU-Net v2 reference environment, test-only.
#
#   bash tests/reference/make_nnunet_env.sh [VENV_DIR]     (default: .venv-nnunet in the repo root)
#
# Idempotent: an existing venv is reused and moved to the pins in requirements-nnunet.txt; running
# it twice installs nothing the second time. Prints the time it took and the venv's size.
#
# Steps and why:
#  1. torch first, pinned from the lock. `pip install torch==2.13.0` takes the CPU wheel on this
#     machine's disk; any unpinned torch requirement would pull a multi-GB CUDA build instead.
#     The lock doubles as the constraints file, so torch's own dependencies land on its pins too.
#  2. everything else from the lock with --no-deps. The lock is complete except for timm (and so
#     torchvision), which dynamic-network-architectures declares but only its transformer models
#     import; no PyPI torchvision imports beside the CPU torch 2.13.0 (see requirements-nnunet.txt).
#     --no-deps keeps pip from resolving that branch at all, so no second torch can be fetched.
#  3. checks: nnU-Net's predictor imports, and `pip check` reports nothing but the missing timm.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
lock="$here/requirements-nnunet.txt"
venv=${1:-"$root/.venv-nnunet"}
start=$(date +%s)

export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)

torch_pin=$(grep -E '^torch==' "$lock")
"${pip[@]}" -c "$lock" "$torch_pin"
"${pip[@]}" --no-deps -c "$lock" -r "$lock"

"$venv/bin/python" -c "
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: F401
import importlib.metadata as md
assert torch.__version__.startswith('2.13.0'), torch.__version__
print('nnunetv2', md.version('nnunetv2'), '| torch', torch.__version__, '| predictor imports')
"
# pip check must list only the deliberately missing timm; anything else means the lock is incomplete.
unexpected=$("$venv/bin/python" -m pip check 2>&1 | grep -v 'requires timm, which is not installed' || true)
if [ -n "$unexpected" ] && [ "$unexpected" != "No broken requirements found." ]; then
    echo "pip check found problems beyond the known missing timm:" >&2
    echo "$unexpected" >&2
    exit 1
fi

echo "nnU-Net env ready in $venv: $(($(date +%s) - start)) s, $(du -sh "$venv" | cut -f1)"
