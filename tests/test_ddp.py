"""Multi-process training through torch's own DDP, launched by torchrun, on the CPU with gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_torchrun_two_processes_stay_in_sync(tmp_path):
    from flarebox.models import write_model_folder
    from flarebox.phantoms import write_dataset
    from tests import nnunet_fixtures

    raw = write_dataset(tmp_path / "raw", 3, 0, spacing_zyx_mm=(4.0, 4.0, 4.0))
    model = write_model_folder(tmp_path / "model", **{**nnunet_fixtures.TINY_PLAIN, "spacing_zyx_mm": (4.0, 4.0, 4.0)})
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "flarebox.training", "train",
           "--dataset", str(raw), "--model", str(model), "--epochs", "2", "--iterations-per-epoch", "2",
           "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ranks 2: parameter checksums" in result.stdout and "in sync" in result.stdout
    assert result.stdout.count("epoch 2/2") == 1  # rank 0 alone logs
    state = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert state["current_epoch"] == 2
