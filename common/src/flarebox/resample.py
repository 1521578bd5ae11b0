"""Resampling kernels shared by preprocessing and export.

Linear resampling uses half-voxel-centre alignment (torch's align_corners=False, scipy's grid_mode):
output voxel j samples input coordinate (j + 0.5) * n_in / n_out - 0.5, clamped to the image.
Trilinear interpolation is separable, so the NumPy engine resizes one axis at a time (two gathers
and a blend per axis), on two threads: faster than torch, scipy.ndimage.zoom and SimpleITK here
(docs/benchmarks.md, engine choices). Importing torch costs more than any of them, so 'auto' uses
torch only in a process that has it loaded already (the torch backend) and NumPy otherwise (the
OpenVINO path, and the Task 2 image, which has no torch at all): the same input gives the same
labels locally and in the image.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

from flarebox.config import ENGINES
from flarebox.parallel import over_slices


def pick_engine(engine: str) -> str:
    if engine == "auto":
        return "torch" if "torch" in sys.modules else "numpy"
    if engine == "torch" and importlib.util.find_spec("torch") is None:
        raise ValueError("resampler 'torch' asked for, but torch is not installed")
    if engine not in ENGINES:
        raise ValueError(f"unknown resampler {engine!r} ({', '.join(ENGINES)})")
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
    out = np.asarray(array, dtype=np.float32)
    lead = out.ndim - 3
    for axis, n_out in enumerate(shape_zyx, start=lead):
        if out.shape[axis] != n_out:
            out = _resize_axis(out, axis, n_out)
    return out


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output voxel along one axis: its two input neighbours and the second one's weight."""
    coords = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    low = np.floor(coords).astype(np.intp)
    return low, np.minimum(low + 1, n_in - 1), (coords - low).astype(np.float32)


def _resize_axis(src: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear resize of one axis; the work is split along another axis over the CPU's threads
    (NumPy's gathers and arithmetic release the GIL)."""
    low, high, weight = linear_taps(src.shape[axis], n_out)
    weight = weight.reshape([n_out if a == axis else 1 for a in range(src.ndim)])
    out = np.empty(src.shape[:axis] + (n_out,) + src.shape[axis + 1:], dtype=np.float32)
    # split along the first other axis with more than one entry (a (1, z, y, x) array: along z)
    split = next((a for a in range(src.ndim) if a != axis and src.shape[a] > 1), 1 if axis == 0 else 0)

    def blend(part: slice) -> None:
        index = (slice(None),) * split + (part,)
        piece = src[index]
        a, b = np.take(piece, low, axis=axis), np.take(piece, high, axis=axis)
        b -= a
        b *= weight
        a += b
        out[index] = a

    over_slices(blend, src.shape[split])
    return out


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel for nearest-neighbour resizing with centre alignment."""
    coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(np.rint(coords), 0, n_in - 1).astype(np.intp)


def resize_nearest(labels: np.ndarray, shape_zyx: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Nearest-neighbour resize of a (z, y, x) label map by index gathering (no interpolation).

    One axis at a time: three contiguous gathers beat one np.ix_ gather. The
    last (largest) gather runs on the CPU's threads split along z, straight into `out` when given
    (a view into a larger array, say): no full-size intermediate."""
    changed = [axis for axis, (n_in, n_out) in enumerate(zip(labels.shape, shape_zyx, strict=True)) if n_in != n_out]
    source = labels
    for axis in changed[:-1]:
        source = np.take(source, nearest_indices(labels.shape[axis], shape_zyx[axis]), axis=axis)
    if not changed:
        if out is None:
            return labels
        out[...] = labels
        return out
    if out is None:
        out = np.empty(shape_zyx, dtype=labels.dtype)
    last = changed[-1]
    index = nearest_indices(labels.shape[last], shape_zyx[last])

    def gather(part: slice) -> None:  # mode="clip": no bounds check (the indices are in range), no buffering
        if last == 0:
            np.take(source, index[part], axis=0, out=out[part], mode="clip")
        else:
            np.take(source[part], index, axis=last, out=out[part], mode="clip")

    over_slices(gather, shape_zyx[0])
    return out
