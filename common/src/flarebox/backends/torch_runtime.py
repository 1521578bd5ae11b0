"""Torch runtime for nnU-Net checkpoints: CPU, or CUDA with fp16 autocast (as nnU-Net predicts)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from flarebox.models import ModelPlan, load_network


class TorchBackend:
    """Networks in eval mode on one device; several networks are an ensemble (logits averaged).
    A `Backend` and a `TensorBackend`; on CUDA also a `GpuBackend` (see backends/__init__.py)."""

    needs_compile = False  # eager: nothing to prepare per tile shape

    def __init__(self, networks: list[torch.nn.Module], patch_zyx: tuple[int, int, int], num_classes: int, *,
                 device: str = "cpu", precision: str = "f32", z_halo: int = 0) -> None:
        self.patch_zyx, self.num_classes, self.z_halo = tuple(patch_zyx), num_classes, z_halo
        self.device = torch.device(device)
        # fp16 is a CUDA setting: CPU kernels for it are slow or missing, so the CPU runs f32
        self.precision = "f32" if precision == "fp16" and self.device.type != "cuda" else precision
        self.networks = [network.to(self.device) for network in networks]
        self._tile_peak: int | None = None  # measured on the first call of tile_peak_bytes

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
        return cls(networks, plan.patch_zyx, plan.num_classes, device=device, precision=precision,
                   z_halo=plan.z_halo)

    def _autocast(self):
        if self.precision == "f32":
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

    def for_patch(self, patch_zyx: tuple[int, int, int]) -> TorchBackend:
        """The same networks for another tile shape (a convolutional network takes any size its
        strides divide)."""
        if tuple(patch_zyx) == self.patch_zyx:
            return self
        return TorchBackend(self.networks, tuple(patch_zyx), self.num_classes, device=str(self.device),
                            precision=self.precision, z_halo=self.z_halo)

    def compile(self) -> None:
        """Nothing to do: torch runs each shape eagerly (cuDNN picks its kernels on the first tile)."""

    # ---- GpuBackend on CUDA: logits summed on the device, memory measured, not guessed -----------
    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def tensors(self) -> TorchBackend:
        return self

    @property
    def gpu(self) -> TorchBackend | None:
        return self if self.on_gpu else None

    def tile_peak_bytes(self) -> int:
        """Device memory one tile needs (weights, activations, workspace), measured once by running
        a zero tile; 0 off the GPU."""
        if not self.on_gpu:
            return 0
        if self._tile_peak is None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            channels = next(self.networks[0].parameters()).shape[1]  # the first conv's input channels
            self.predict_tensor(torch.zeros((1, channels, *self.patch_zyx), device=self.device))
            torch.cuda.synchronize(self.device)
            self._tile_peak = int(torch.cuda.max_memory_allocated(self.device))
        return self._tile_peak

    def accumulation_place(self, padded_shape_zyx: tuple[int, ...], budget_bytes: int) -> str:
        """'device' when the tile's own peak plus the rolling band of sums (k + 1 float32 volumes of
        one patch depth, see sliding_window) and one band sent home, with 10 % for the caching
        allocator's fragmentation, stay within the budget; else 'host' (the GPU then only runs tiles,
        and logits cross the bus per tile)."""
        if not self.on_gpu:
            return "host"
        band_bytes = self.patch_zyx[0] * int(np.prod(padded_shape_zyx[1:])) * 4
        need = 1.1 * (self.tile_peak_bytes() + (2 * self.num_classes + 1) * band_bytes)
        return "device" if need <= budget_bytes else "host"

    def reset_peak(self) -> None:
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        """Peak device memory allocated by torch since reset_peak (0 off the GPU)."""
        return int(torch.cuda.max_memory_allocated(self.device)) if self.on_gpu else 0

    def release(self) -> None:
        """Give cached blocks back after a case (or an out-of-memory error)."""
        if self.on_gpu:
            torch.cuda.empty_cache()
