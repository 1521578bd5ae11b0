"""Torch runtime for nnU-Net checkpoints: CPU, or CUDA with fp16 autocast (as nnU-Net predicts)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from flarebox.models import ModelPlan, load_network


class TorchBackend:
    """Networks in eval mode on one device; several networks are an ensemble (logits averaged)."""

    def __init__(self, networks: list[torch.nn.Module], patch_zyx: tuple[int, int, int], num_classes: int, *,
                 device: str = "cpu", precision: str = "f32") -> None:
        self.patch_zyx, self.num_classes = tuple(patch_zyx), num_classes
        self.device = torch.device(device)
        self.precision = precision
        self.networks = [network.to(self.device) for network in networks]

    @classmethod
    def from_plan(
        cls,
        plan: ModelPlan,
        *,
        device: str = "cpu",
        precision: str = "f32",
        folds: tuple[int, ...] = (0,),
        checkpoint: str = "checkpoint_final.pth",
        threads: int = 0,
    ) -> TorchBackend:
        if threads > 0:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cuda":
            torch.backends.cudnn.benchmark = True
        networks = [load_network(plan, fold, checkpoint) for fold in folds]
        return cls(networks, plan.patch_zyx, plan.num_classes, device=device, precision=precision)

    def _autocast(self):
        # fp16 is a CUDA setting: CPU kernels for it are slow or missing, so the CPU runs f32.
        if self.precision == "f32" or (self.precision == "fp16" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def predict_tensor(self, tile: torch.Tensor) -> torch.Tensor:
        """(1, c, *patch) on any device -> (1, k, *patch) float32 logits on the backend's device."""
        x = tile.to(self.device, dtype=torch.float32, non_blocking=True)
        with self._autocast():
            total = None
            for network in self.networks:
                out = network(x).float()
                total = out if total is None else total + out
        return total / len(self.networks)

    def predict(self, tile: np.ndarray) -> np.ndarray:
        return self.predict_tensor(torch.from_numpy(tile)).cpu().numpy()
