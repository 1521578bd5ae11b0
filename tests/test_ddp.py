"""Multi-process training through torch's own DDP, launched by torchrun, on the CPU with gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import TINY_NETWORK_TOML

TRAIN_TOML = TINY_NETWORK_TOML + """
[train]
epochs = 2
iterations_per_epoch = 2
batch_size = 2
validation_cases = 1
validate_every_epochs = 2
device = "cpu"
"""


def test_torchrun_two_ranks_train_in_sync_and_rank0_writes(tmp_path):
    from flarebox_tools.phantoms import write_dataset

    raw = write_dataset(tmp_path / "raw", 3, 0, spacing_zyx_mm=(4.0, 4.0, 4.0))
    (tmp_path / "train.toml").write_text(TRAIN_TOML)
    model, logs = tmp_path / "model", tmp_path / "logs"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs), "--tee", "3",
           "-m", "flarebox_tools.training", "--dataset", str(raw), "--out", str(model),
           "--config", str(tmp_path / "train.toml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # both ranks ran to the end, each with its own stdout; only rank 0 reports epochs
    rank_logs = {p.parent.name: p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(rank_logs) == ["0", "1"]
    assert "epoch    2/2" in rank_logs["0"] and "epoch" not in rank_logs["1"]

    state = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    digests = state["logging"]["parameter_digests_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # DDP kept the replicas identical
    assert state["current_epoch"] == 2 and len(state["logging"]["train_losses"]) == 2
    assert {p.name for p in (model / "fold_0").iterdir()} <= {"checkpoint_final.pth", "checkpoint_latest.pth",
                                                              "checkpoint_best.pth"}
    assert not list(model.rglob(".*.tmp"))  # writes were atomic and only rank 0 wrote
