"""Network runtimes behind one small interface (see sliding_window.Backend).

`load_backend` builds a complete, ready-to-run backend from a model folder in one call:
OpenVINO on CPU (precision f32, bf16 or int8, from the IR that `flarebox convert` writes), or torch
on CPU or CUDA (fp16 autocast on CUDA) straight from the nnU-Net checkpoints. Several folds are an
ensemble: their logits are averaged.
"""

from __future__ import annotations

from pathlib import Path

from flarebox.errors import ConfigError
from flarebox.models import ModelPlan

BACKENDS = ("openvino", "torch")
PRECISIONS = {"openvino": ("f32", "bf16", "int8"), "torch": ("f32", "fp16", "bf16")}


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
):
    """A backend for `plan` (see the module docstring); raises ConfigError naming what is missing."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {BACKENDS}")
    if precision not in PRECISIONS[backend]:
        raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS[backend]} for {backend}")
    if backend == "openvino":
        if device != "cpu":
            raise ConfigError("the openvino backend runs on device 'cpu' only")
        from flarebox.backends.openvino_runtime import OpenVINOBackend

        return OpenVINOBackend(plan, precision=precision, folds=folds, threads=threads, cache_dir=cache_dir)
    from flarebox.backends.torch_runtime import TorchBackend

    return TorchBackend.from_plan(plan, device=device, precision=precision, folds=folds, checkpoint=checkpoint,
                                  threads=threads)
