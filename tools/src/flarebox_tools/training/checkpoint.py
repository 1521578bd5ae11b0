"""Checkpoints with nnU-Net v2's keys, so `flarebox.models.load_network`, nnU-Net's predictor and
`--continue` all read them.

nnU-Net's predictor needs `network_weights`, `trainer_name` (a trainer class it can find:
"nnUNetTrainer", whose network nnU-Net builds from plans.json exactly as we do),
`init_args["configuration"]` and `inference_allowed_mirroring_axes`; its trainer, to continue, also
`optimizer_state`, `grad_scaler_state`, `logging`, `_best_ema` and `current_epoch` (the number of
epochs done). `init_args` holds what nnU-Net's trainer was constructed with: plans, configuration,
fold, dataset_json, device. Our additions live inside `logging` (validation DSC/NSD per class, the
torchrun ranks' parameter digests), which nnU-Net only stores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TRAINER_NAME = "nnUNetTrainer"


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DDP and torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict on the CPU, so the file loads on a machine without the training GPU. A tensor
    listed under two names (dynamic-network-architectures' decoder keeps a reference to the encoder)
    is copied once, so torch.save still stores it once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().cpu().contiguous()  # channels-last weights load anywhere
        out[name] = copies[key]
    return out


def save(
    path: str | Path,
    network: torch.nn.Module,
    *,
    model_dir: Path,
    fold: int,
    epochs_done: int,
    logging: dict[str, Any],
    best_ema: float | None,
    mirror_axes: tuple[int, ...],
    optimizer: torch.optim.Optimizer | None = None,
    grad_scaler: Any = None,
    partner: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
) -> Path:
    """Write a checkpoint atomically. optimizer=None leaves its state out: SGD's momentum doubles
    the file, AdamW's two moments triple it. partner: cross pseudo supervision's second network
    and its optimiser, kept under `cps_partner` to go on training (never shipped)."""
    checkpoint = {
        "network_weights": cpu_state_dict(unwrap(network)),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "grad_scaler_state": grad_scaler.state_dict() if grad_scaler is not None else None,
        "logging": logging,
        "_best_ema": best_ema,
        "current_epoch": epochs_done,
        "init_args": {
            "plans": json.loads((model_dir / "plans.json").read_text()),
            "configuration": "3d_fullres",
            "fold": fold,
            "dataset_json": json.loads((model_dir / "dataset.json").read_text()),
            "device": torch.device("cpu"),
        },
        "trainer_name": TRAINER_NAME,
        "inference_allowed_mirroring_axes": tuple(mirror_axes),
    }
    if partner is not None:
        checkpoint["cps_partner"] = {"network_weights": cpu_state_dict(unwrap(partner[0])),
                                     "optimizer_state": partner[1].state_dict()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def strip_optimizer(path: str | Path) -> Path:
    """Rewrite a checkpoint without optimizer and grad-scaler state, nor a CPS partner (for shipping)."""
    checkpoint = load(path)
    checkpoint["optimizer_state"] = None
    checkpoint["grad_scaler_state"] = None
    checkpoint.pop("cps_partner", None)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return Path(path)
