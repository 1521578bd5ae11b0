"""Infer: nnU-Net's sliding-window prediction over a preprocessed (c, z, y, x) array.

Tiles are placed as nnU-Net v2 places them (step = a fraction of the patch, spread evenly so the
last tile ends at the border), each tile's logits are weighted by a Gaussian importance map
(sigma = patch / 8) and the weighted sum is divided by the summed weights. Axes smaller than the
patch are padded with zeros, split evenly before and after. Mirroring (test-time augmentation) is
off by default, as in the published FLARE entries.

A 2.5D network (networks.LightUNet, `backend.z_halo` > 0) segments each slice of a tile from the
slices beside it; a tile's end slices lack one side. Its tiles overlap along z by at least twice
the halo, and its weights are flat along z but for the halo slices, weighted almost nothing: every
slice takes its logits from a tile where its neighbours are real (the scan's own first and last
slices, which no tile holds inside, take the repeated neighbour, as a slice loop would).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from flarebox.parallel import over_slices
from flarebox.preprocess import NNUNET_PADDING, PadValues

if TYPE_CHECKING:
    from flarebox.backends import Backend, TensorBackend


def tile_starts(image_zyx: tuple[int, ...], patch_zyx: tuple[int, ...],
                step_size: float | tuple[float, ...]) -> list[list[int]]:
    """Start index of every tile along each axis (nnU-Net's placement); step_size: one for all
    axes, or one per axis."""
    steps = step_size if isinstance(step_size, tuple) else (step_size,) * len(patch_zyx)
    if not all(0 < step <= 1 for step in steps):
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    starts = []
    for size, patch, step_size in zip(image_zyx, patch_zyx, steps, strict=True):
        if size < patch:
            raise ValueError(f"image axis of {size} is smaller than the patch ({patch}); pad it first")
        n_steps = int(np.ceil((size - patch) / (patch * step_size))) + 1
        stride = (size - patch) / (n_steps - 1) if n_steps > 1 else 0.0
        starts.append([int(np.round(stride * i)) for i in range(n_steps)])
    return starts


def _gaussian_kernel(sigma: float, length: int) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1D kernel (truncated at 4 sigma, normalised to sum 1) applied
    to an impulse at index length // 2 of an axis of `length` with zero padding: the kernel itself,
    cut to the axis. The test suite checks the 3D product against gaussian_filter bit for bit;
    computing it here keeps scipy out of the inference path's imports."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / (sigma * sigma) * x**2)
    kernel = kernel / kernel.sum()
    out = np.zeros(length, dtype=np.float64)
    centre = length // 2
    lo, hi = max(centre - radius, 0), min(centre + radius + 1, length)
    out[lo:hi] = kernel[lo - centre + radius: hi - centre + radius]
    return out


@lru_cache(maxsize=4)
def gaussian_importance(patch_zyx: tuple[int, ...], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian weight map peaking at the patch centre (max 1, no zeros: zeros would divide by 0).

    Made as nnU-Net v2 makes it (gaussian_filter of an impulse, sigma = patch / 8): scaled to a
    peak of 10 and rounded to float16, where weights under float16's range become 0 and are then
    raised to the smallest nonzero weight. Far from the centre that differs from the exact Gaussian
    by orders of magnitude, and it decides how overlapping tiles blend at the image border, so it
    is kept for parity. It takes a noticeable moment for a large patch: the pipeline makes a fitted
    tile's map while that shape compiles."""
    z, y, x = (_gaussian_kernel(p * sigma_scale, p) for p in patch_zyx)
    weights = (z[:, None, None] * y[None, :, None]) * x[None, None, :]  # gaussian_filter's axis order
    half = (weights * (10.0 / weights.max())).astype(np.float16)
    bits = half.view(np.uint16)  # the weights are >= 0, whose float16 bits order as their values do
    bits[bits == 0] = bits[bits != 0].min()  # half[half == 0] = half[half > 0].min(), on the bits
    weights = half.astype(np.float32) / np.float32(10.0)
    weights.setflags(write=False)
    return weights


# a 2.5D tile's halo slices: nonzero, so that the scan's end slices, which only a halo covers, keep
# a value, but far below any slice with both neighbours
HALO_WEIGHT = 1e-6


def slice_steps(patch_zyx: tuple[int, ...], step_size: float, z_halo: int) -> float | tuple[float, ...]:
    """The sliding window's steps: `step_size` on every axis for a 3D network; for a 2.5D one, z
    steps by the patch less both halos (consecutive tiles overlap by exactly the halos)."""
    if z_halo <= 0:
        return step_size
    depth = patch_zyx[0]
    if depth <= 2 * z_halo:
        raise ValueError(f"a tile of {depth} slices has none with both neighbours (halo {z_halo})")
    return ((depth - 2 * z_halo) / depth, *(step_size,) * (len(patch_zyx) - 1))


@lru_cache(maxsize=4)
def importance_map(patch_zyx: tuple[int, ...], z_halo: int = 0) -> np.ndarray:
    """The tiles' blending weights: nnU-Net's Gaussian for a 3D network; for a 2.5D one (z_halo
    > 0) the in-plane Gaussian, flat along z but HALO_WEIGHT on the halo slices."""
    if z_halo <= 0:
        return gaussian_importance(patch_zyx)
    plane = gaussian_importance((1, *patch_zyx[1:]))
    along_z = np.ones(patch_zyx[0], dtype=np.float32)
    along_z[:z_halo] = along_z[-z_halo:] = HALO_WEIGHT
    weights = along_z[:, None, None] * plane
    weights.setflags(write=False)
    return weights


def pad_to_patch(data: np.ndarray, patch_zyx: tuple[int, ...], values: PadValues = NNUNET_PADDING
                 ) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad spatial axes smaller than the patch, evenly on both sides, with `values` per axis and
    side (nnU-Net: 0 everywhere); return the undo slices."""
    pads = [(0, 0)]
    undo = [slice(None)]
    for size, patch in zip(data.shape[1:], patch_zyx, strict=True):
        diff = max(patch - size, 0)
        pads.append((diff // 2, diff - diff // 2))
        undo.append(slice(diff // 2, diff // 2 + size))
    if all(p == (0, 0) for p in pads):
        return data, tuple(undo)
    return np.pad(data, pads, mode="constant", constant_values=((0.0, 0.0), *values)), tuple(undo)


def tiles(shape_zyx: tuple[int, ...], patch_zyx: tuple[int, ...],
          step_size: float | tuple[float, ...]) -> Iterator[tuple[slice, ...]]:
    for start in itertools.product(*tile_starts(shape_zyx, patch_zyx, step_size)):
        yield tuple(slice(s, s + p) for s, p in zip(start, patch_zyx, strict=True))


def fitted_patch(shape_zyx: tuple[int, ...], patch_zyx: tuple[int, ...],
                 divisor_zyx: tuple[int, ...]) -> tuple[int, ...]:
    """The model's patch, shrunk along each axis where the image is smaller than it to the smallest
    size that covers the image and that the network's strides divide. The same tiles then hold
    less zero padding and cost less; instance normalisation sees less padding too, so logits near
    such an image's border change slightly (measured in docs/benchmarks.md)."""
    return tuple(min(p, -(-s // d) * d) for s, p, d in zip(shape_zyx, patch_zyx, divisor_zyx, strict=True))


FLIPS = [axes for n in (1, 2, 3) for axes in itertools.combinations((2, 3, 4), n)]  # of (b, c, z, y, x)


class _HostArrays:
    """NumPy: the backend takes and returns arrays (OpenVINO, or torch through predict())."""

    def __init__(self, backend: Backend, padded: np.ndarray) -> None:
        self.backend, self.source = backend, padded

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def from_numpy(self, array: np.ndarray) -> np.ndarray:
        return array

    def tile_logits(self, region: tuple[slice, ...], mirroring: bool) -> np.ndarray:
        tile = np.ascontiguousarray(self.source[(slice(None), *region)])[None]
        logits = self.backend.predict(tile)[0]
        if mirroring:  # the next call may overwrite the first logits' buffer
            logits = logits.copy()
        for axes in FLIPS if mirroring else ():
            logits += np.flip(self.backend.predict(np.ascontiguousarray(np.flip(tile, axes)))[0],
                              tuple(a - 1 for a in axes))
        return logits

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def argmax(self, array: np.ndarray) -> np.ndarray:
        return argmax_classes(array)

    def copy(self, array: np.ndarray) -> np.ndarray:
        return array.copy()


def argmax_classes(scores: np.ndarray) -> np.ndarray:
    """np.argmax(scores, axis=0) as uint8 (first maximum wins, as there), for (k, z, y, x) float
    scores with k < 256, on the CPU's threads split along z: the maximum over the classes in one
    reduction, then each class, last to first, marks where it reaches it. NumPy's own argmax over a
    leading axis transposes the whole array first (docs/benchmarks.md, engine choices)."""
    labels = np.zeros(scores.shape[1:], dtype=np.uint8)  # NaN scores equal nothing: label 0

    def run(part: slice) -> None:
        best, out = scores[:, part].max(axis=0), labels[part]
        reaches = np.empty(best.shape, dtype=bool)
        for k in range(scores.shape[0] - 1, -1, -1):
            np.equal(scores[k, part], best, out=reaches)
            np.copyto(out, np.uint8(k), where=reaches)

    over_slices(run, scores.shape[1])
    return labels


class _DeviceArrays:
    """torch on the backend's device (TorchBackend): tiles go up, only finished slices come back."""

    def __init__(self, backend: TensorBackend, padded: np.ndarray) -> None:
        import torch

        self.torch, self.backend, self.device = torch, backend, backend.device
        self.source = torch.from_numpy(padded)  # stays in host memory: a whole-body CT is a GPU gigabyte

    def zeros(self, shape: tuple[int, ...]):
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def from_numpy(self, array: np.ndarray):
        return self.torch.from_numpy(array.copy()).to(self.device)

    def tile_logits(self, region: tuple[slice, ...], mirroring: bool):
        flip = self.torch.flip
        tile = self.source[(slice(None), *region)][None].to(self.device, non_blocking=True)
        logits = self.backend.predict_tensor(tile)[0]
        for axes in FLIPS if mirroring else ():
            logits += flip(self.backend.predict_tensor(flip(tile, axes))[0], [a - 1 for a in axes])
        return logits

    def to_host(self, tensor) -> np.ndarray:
        return tensor.cpu().numpy()

    def argmax(self, tensor):
        return tensor.argmax(0)

    def copy(self, tensor):
        return tensor.clone()


ACCUMULATE = ("host", "device")


def predict_logits(
    data: np.ndarray,
    backend: Backend,
    *,
    step_size: float = 0.5,
    mirroring: bool = False,
    on_tile: Callable[[int, int], None] | None = None,
    accumulate: str = "host",
    labels: bool = False,
    pad_values: PadValues = NNUNET_PADDING,
) -> np.ndarray:
    """Sliding-window logits (or labels) of a preprocessed (c, z, y, x) array.

    step_size: tile step as a fraction of the patch (0.5 = nnU-Net default); along z for a 2.5D
        network (`backend.z_halo` > 0), the patch less its halos (module docstring).
    mirroring: average over the 7 flips of the three axes too (8x the work).
    on_tile: called as on_tile(done, total) after each tile, for progress reporting.
    accumulate: 'host' sums the weighted tiles in NumPy; 'device' sums them in torch on the
        backend's device (a GPU: no logits cross the bus per tile), for a backend that runs torch
        (`backend.tensors`); on a GPU, `backend.gpu.accumulation_place` says which fits.
    labels: return the argmax (uint8) instead of the logits: the full (k, z, y, x) logits never
        exist then, only one band of them.
    pad_values: what the network sees beyond an image smaller than the patch, per axis and side
        (nnU-Net: 0; `Preprocessed.pad_values` says where a crop calls for something else).
    Returns (k, z, y, x) float32 logits, or (z, y, x) uint8 labels, on the unpadded grid, in host memory.

    Tiles come in z order, so once a row of tiles starting at z0 begins, every slice above z0 is
    final. The weighted sums live in a band one patch deep that rolls down the volume: finished
    slices are divided by their summed weights (or reduced to labels) and leave the band, which
    holds (k + 1) band volumes whatever the scan's length, on the host or on the GPU.
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    patch, halo = tuple(backend.patch_zyx), backend.z_halo
    data = np.asarray(data, dtype=np.float32)
    if halo and data.shape[1] < patch[0]:  # a 2.5D network's end slices repeat (as a slice loop's would)
        slices, before = data.shape[1], (patch[0] - data.shape[1]) // 2
        data = np.pad(data, ((0, 0), (before, patch[0] - slices - before), (0, 0), (0, 0)), mode="edge")
        padded, undo = pad_to_patch(data, patch, pad_values)
        undo = (undo[0], slice(before, before + slices), *undo[2:])
    else:
        padded, undo = pad_to_patch(data, patch, pad_values)
    slicers = list(tiles(padded.shape[1:], patch, slice_steps(patch, step_size, halo)))
    if accumulate == "device":
        import torch

        tensors = backend.tensors
        if tensors is None:
            raise ValueError("accumulate='device' needs a backend that runs torch")

        # inference mode: the backend returns inference tensors, and summing them in place needs it
        with torch.inference_mode():
            out = _band_sums(_DeviceArrays(tensors, padded), backend, padded.shape[1:], slicers, mirroring, labels,
                             on_tile)
    elif labels and padded.shape[2:] == patch[1:]:  # one tile per row: the tiles form a column along z
        out = _column_labels(_HostArrays(backend, padded), backend, padded.shape[1:], slicers, mirroring, on_tile)
    else:
        out = _band_sums(_HostArrays(backend, padded), backend, padded.shape[1:], slicers, mirroring, labels, on_tile)
    return out[undo[1:]] if labels else out[undo]


def _column_labels(arrays: _HostArrays, backend: Backend, shape: tuple[int, ...], slicers: list[tuple[slice, ...]],
                   mirroring: bool, on_tile: Callable[[int, int], None] | None) -> np.ndarray:
    """Labels where every tile spans the whole (padded) y-x plane, so the tiles form one column
    along z (fitted tiles on a body-cropped CT). A slice that one tile alone covers takes that
    tile's argmax: its Gaussian weight scales all classes alike. Only the slices where neighbouring
    tiles overlap are weighted and summed, in a carry as deep as the overlap: at step 0.75 about a
    quarter of what a band one patch deep sums, shifts and clears, and a quarter of its memory."""
    k, depth = backend.num_classes, int(backend.patch_zyx[0])
    weights = importance_map(tuple(backend.patch_zyx), backend.z_halo)
    starts = [region[0].start for region in slicers]
    ends = [start + depth for start in starts]
    finals = [*starts[1:], shape[0]]  # after tile i, no later tile reaches the slices below finals[i]
    out = np.empty(shape, dtype=np.uint8)
    carry = np.empty((k, max(max(e - f for e, f in zip(ends, finals, strict=True)), 0), *shape[1:]), np.float32)
    bottom = 0  # at each tile, carry[:, j] holds the weighted sum of slice start + j, up to bottom
    for done, (region, start, end, final) in enumerate(zip(slicers, starts, ends, finals, strict=True), start=1):
        logits = arrays.tile_logits(region, mirroring)  # (k, depth, y, x), maybe the runtime's own buffer
        summed = max(min(bottom, end) - start, 0)  # the tile's first slices, which earlier tiles reach too
        if summed:
            part = slice(0, summed)
            carry[:, part] += np.multiply(logits[:, part], weights[part], out=logits[:, part])
        done_summed = min(summed, final - start)  # of them, those no later tile reaches
        if done_summed > 0:
            out[start:start + done_summed] = argmax_classes(carry[:, :done_summed])
        if final > start + summed:  # this tile's alone: its own argmax
            out[start + summed:final] = argmax_classes(logits[:, summed:final - start])
        kept = max(start + summed - final, 0)  # summed slices that later tiles reach too (steps < 0.5)
        if kept:
            carry[:, :kept] = carry[:, final - start:final - start + kept]
        fresh = max(final, start + summed) - start  # later tiles reach these: weighted into the carry
        if end - start > fresh:
            np.multiply(logits[:, fresh:], weights[fresh:], out=carry[:, fresh - (final - start):end - final])
        bottom = max(end, final)
        if on_tile is not None:
            on_tile(done, len(slicers))
    return out


def _band_sums(arrays, backend: Backend, shape: tuple[int, ...], slicers: list[tuple[slice, ...]], mirroring: bool,
               labels: bool, on_tile: Callable[[int, int], None] | None) -> np.ndarray:
    k, depth = backend.num_classes, int(backend.patch_zyx[0])
    out = np.empty(shape, dtype=np.uint8) if labels else np.empty((k, *shape), dtype=np.float32)
    # float32 sums, not nnU-Net's float16: in float16, products with the tiny weights at tile corners
    # fall below its range, which costs nnU-Net up to 2 % of the largest logit at image corners.
    weights = arrays.from_numpy(importance_map(tuple(backend.patch_zyx), backend.z_halo))
    # the logits' weights: with mirroring the tile's logits are a sum over 8 flips, whose mean this takes
    logit_weights = weights / (len(FLIPS) + 1) if mirroring else weights
    band = arrays.zeros((k, depth, *shape[1:]))
    band_weights = arrays.zeros((depth, *shape[1:]))
    top = 0  # the z of band[:, 0]

    def flush(stop: int) -> None:  # slices top..stop are final: out, then shift the band up by n
        n = stop - top
        if labels:  # argmax needs no division: a voxel's weight sum scales all its classes alike
            out[top:stop] = arrays.to_host(arrays.argmax(band[:, :n]))
        else:
            out[:, top:stop] = arrays.to_host(band[:, :n] / band_weights[:n])
        band[:, : depth - n] = arrays.copy(band[:, n:])
        band[:, depth - n:] = 0
        band_weights[: depth - n] = arrays.copy(band_weights[n:])
        band_weights[depth - n:] = 0

    for done, region in enumerate(slicers, start=1):
        z0 = region[0].start
        if z0 > top:
            flush(z0)
            top = z0
        logits = arrays.tile_logits(region, mirroring)
        logits *= logit_weights
        local = (slice(0, depth), *region[1:])
        band[(slice(None), *local)] += logits
        band_weights[local] += weights
        if on_tile is not None:
            on_tile(done, len(slicers))
    flush(shape[0])
    return out
