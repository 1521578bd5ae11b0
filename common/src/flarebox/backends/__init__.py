"""Network runtimes behind one interface, `Backend`, written here once.

`load_backend` builds a complete, ready-to-run backend from a model folder in one call:
OpenVINO on CPU (precision f32, bf16 or int8, from the IR that `flarebox-tools convert` writes, or
auto: chosen by the CPU's instruction sets, flarebox.cpu), or
torch on CPU or CUDA (fp16 autocast on CUDA) straight from the nnU-Net checkpoints. Several folds
are an ensemble: their logits are averaged. Two optional capabilities are explicit members, None
where absent: `tensors` (torch tensors in and out, so the sliding window can sum where the network
runs) and `gpu` (device memory measured and managed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from flarebox.config import BACKENDS, PRECISIONS
from flarebox.errors import ConfigError
from flarebox.models import ModelPlan

if TYPE_CHECKING:
    import torch

log = logging.getLogger("flarebox")


class Backend(Protocol):
    """What the pipeline and the sliding window call on a network runtime."""

    patch_zyx: tuple[int, int, int]  # the tile shape it runs
    num_classes: int
    # slices a 2.5D network reads on each side of the one it segments (0: a 3D network); the
    # sliding window overlaps tiles along z by twice this
    z_halo: int
    precision: str  # what the network runs in (torch's fp16 setting runs f32 on the CPU)
    needs_compile: bool  # compile() does work (OpenVINO compiles each tile shape; torch runs eagerly)

    def predict(self, tile: np.ndarray) -> np.ndarray:
        """(1, c, *patch) float32 -> (1, k, *patch) float32 logits, which may live in the runtime's
        own buffer (OpenVINO): the caller may change them, and must copy them to keep them past
        the next call."""
        ...

    def for_patch(self, patch_zyx: tuple[int, int, int]) -> Backend:
        """The same model for another tile shape (fitted tiles)."""
        ...

    def compile(self) -> None:
        """Make this tile shape ready now rather than on the first tile (the pipeline does it while
        the voxels are prepared)."""
        ...

    @property
    def tensors(self) -> TensorBackend | None:
        """The runtime's torch interface where it runs torch (any device), else None (OpenVINO)."""
        ...

    @property
    def gpu(self) -> GpuBackend | None:
        """The GPU capabilities when the backend runs on a GPU, else None."""
        ...


class TensorBackend(Protocol):
    """Tiles in and logits out as torch tensors on the backend's device (TorchBackend, any device):
    what the sliding window needs to sum logits where the network runs."""

    device: torch.device
    patch_zyx: tuple[int, int, int]
    num_classes: int

    def predict_tensor(self, tile: torch.Tensor) -> torch.Tensor:
        """(1, c, *patch) on any device -> (1, k, *patch) float32 logits on the backend's device."""
        ...


class GpuBackend(Protocol):
    """What a backend on a GPU adds (TorchBackend on CUDA): its memory, measured and managed."""

    def accumulation_place(self, padded_shape_zyx: tuple[int, ...], budget_bytes: int) -> str:
        """'device' when the sliding window's sums fit the GPU budget beside a tile, else 'host'."""
        ...

    def reset_peak(self) -> None:
        """Start measuring the peak device memory afresh (before a case)."""
        ...

    def peak_bytes(self) -> int:
        """Peak device memory allocated since reset_peak."""
        ...

    def release(self) -> None:
        """Give cached device memory back (after a case, or an out-of-memory error)."""
        ...


def load_backend(
    plan: ModelPlan,
    *,
    backend: str = "openvino",
    device: str = "cpu",
    precision: str = "f32",
    folds: tuple[int, ...] = (0,),
    checkpoint: str = "checkpoint_final.pth",
    threads: int = 0,
    cache_dir: Path | None = None,
) -> Backend:
    """A backend for `plan` (see the module docstring); raises ConfigError naming what is missing."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}")
    if precision not in PRECISIONS[backend]:
        raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS[backend]} for {backend}")
    if backend == "openvino":
        if device != "cpu":
            raise ConfigError("the openvino backend runs on device 'cpu' only")
        from flarebox.backends.openvino_runtime import OpenVINOBackend, ir_path, manifest_entry

        if precision == "auto":
            from flarebox.cpu import openvino_precision

            has_int8 = all(ir_path(plan, fold, "int8").is_file() for fold in folds)
            precision, why = openvino_precision(has_int8, manifest_entry(plan, "int8_overflow_fix"),
                                                without_vnni=manifest_entry(plan, "int8_without_vnni"))
            log.info("precision auto: %s for %s (%s)", precision, plan.folder.name, why)

        return OpenVINOBackend(plan, precision=precision, folds=folds, threads=threads, cache_dir=cache_dir)
    from flarebox.backends.torch_runtime import TorchBackend

    return TorchBackend.from_plan(plan, device=device, precision=precision, folds=folds, checkpoint=checkpoint,
                                  threads=threads)
