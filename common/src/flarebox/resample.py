"""Resampling kernels shared by preprocessing and export.

Linear resampling uses half-voxel-centre alignment (torch's align_corners=False, scipy's grid_mode):
output voxel j samples input coordinate (j + 0.5) * n_in / n_out - 0.5. Measured on two cores
(512x512x300 CT to 2.5 mm, `make bench`): torch 0.04 s, SimpleITK 0.26 s, scipy 0.32 s. But importing
torch costs ~0.7 s, so 'auto' uses torch only in a process that has it loaded already (the torch
backend) and scipy otherwise (the OpenVINO path, and the Task 2 image, which has no torch at all):
the same input gives the same labels locally and in the image.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
from scipy import ndimage


def pick_engine(engine: str) -> str:
    if engine == "auto":
        return "torch" if "torch" in sys.modules else "scipy"
    if engine == "torch" and importlib.util.find_spec("torch") is None:
        raise ValueError("resampler 'torch' asked for, but torch is not installed")
    if engine not in ("torch", "scipy"):
        raise ValueError(f"unknown resampler {engine!r} (auto, torch, scipy)")
    return engine


def resize_linear(array: np.ndarray, shape_zyx: tuple[int, ...], engine: str = "auto") -> np.ndarray:
    """Trilinear resize of a (z, y, x) or (c, z, y, x) float array to `shape_zyx`; returns float32."""
    shape_zyx = tuple(int(s) for s in shape_zyx)
    if tuple(array.shape[-3:]) == shape_zyx:
        return np.asarray(array, dtype=np.float32)
    if pick_engine(engine) == "torch":
        import torch

        with torch.no_grad():
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            batch = tensor.reshape(1, -1, *array.shape[-3:])
            out = torch.nn.functional.interpolate(batch, size=shape_zyx, mode="trilinear", align_corners=False)
            return out.reshape(*array.shape[:-3], *shape_zyx).numpy()
    src = np.asarray(array, dtype=np.float32)
    zoom = [1.0] * (src.ndim - 3) + [o / i for o, i in zip(shape_zyx, src.shape[-3:], strict=True)]
    return ndimage.zoom(src, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel for nearest-neighbour resizing with centre alignment."""
    coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(np.rint(coords), 0, n_in - 1).astype(np.intp)


def resize_nearest(labels: np.ndarray, shape_zyx: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a (z, y, x) label map by index gathering (no interpolation).

    One axis at a time: three contiguous gathers are 3x faster than one np.ix_ gather here."""
    out = labels
    for axis, (n_in, n_out) in enumerate(zip(labels.shape, shape_zyx, strict=True)):
        if n_in != n_out:
            out = np.take(out, nearest_indices(n_in, n_out), axis=axis)
    return out
