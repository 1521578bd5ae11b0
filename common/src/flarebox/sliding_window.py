"""Infer: nnU-Net's sliding-window prediction over a preprocessed (c, z, y, x) array.

Tiles are placed as nnU-Net v2 places them (step = a fraction of the patch, spread evenly so the
last tile ends at the border), each tile's logits are weighted by a Gaussian importance map
(sigma = patch / 8) and the weighted sum is divided by the summed weights. Axes smaller than the
patch are padded with zeros, split evenly before and after. Mirroring (test-time augmentation) is
off by default, as in the published FLARE entries.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Protocol

import numpy as np
from scipy.ndimage import gaussian_filter


class Backend(Protocol):
    """What the sliding window needs from a network runtime."""

    patch_zyx: tuple[int, int, int]
    num_classes: int

    def predict(self, tile: np.ndarray) -> np.ndarray:
        """(1, c, *patch) float32 -> (1, k, *patch) float32 logits."""
        ...


def tile_starts(image_zyx: tuple[int, ...], patch_zyx: tuple[int, ...], step_size: float) -> list[list[int]]:
    """Start index of every tile along each axis (nnU-Net's placement)."""
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    starts = []
    for size, patch in zip(image_zyx, patch_zyx, strict=True):
        if size < patch:
            raise ValueError(f"image axis of {size} is smaller than the patch ({patch}); pad it first")
        n_steps = int(np.ceil((size - patch) / (patch * step_size))) + 1
        stride = (size - patch) / (n_steps - 1) if n_steps > 1 else 0.0
        starts.append([int(np.round(stride * i)) for i in range(n_steps)])
    return starts


@lru_cache(maxsize=4)
def gaussian_importance(patch_zyx: tuple[int, ...], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian weight map peaking at the patch centre (max 1, no zeros: zeros would divide by 0).

    Made as nnU-Net v2 makes it: scaled to a peak of 10 and rounded to float16, where weights under
    float16's range become 0 and are then raised to the smallest nonzero weight. Far from the centre
    that differs from the exact Gaussian by orders of magnitude, and it decides how overlapping
    tiles blend at the image border, so it is kept for parity."""
    impulse = np.zeros(patch_zyx, dtype=np.float64)
    impulse[tuple(p // 2 for p in patch_zyx)] = 1.0
    weights = gaussian_filter(impulse, [p * sigma_scale for p in patch_zyx], 0, mode="constant", cval=0)
    half = (weights * (10.0 / weights.max())).astype(np.float16)
    half[half == 0] = half[half > 0].min()
    weights = half.astype(np.float32) / np.float32(10.0)
    weights.setflags(write=False)
    return weights


def pad_to_patch(data: np.ndarray, patch_zyx: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad spatial axes smaller than the patch, evenly on both sides; return the undo slices."""
    pads = [(0, 0)]
    undo = [slice(None)]
    for size, patch in zip(data.shape[1:], patch_zyx, strict=True):
        diff = max(patch - size, 0)
        pads.append((diff // 2, diff - diff // 2))
        undo.append(slice(diff // 2, diff // 2 + size))
    if all(p == (0, 0) for p in pads):
        return data, tuple(undo)
    return np.pad(data, pads, mode="constant", constant_values=0), tuple(undo)


def tiles(shape_zyx: tuple[int, ...], patch_zyx: tuple[int, ...], step_size: float) -> Iterator[tuple[slice, ...]]:
    for start in itertools.product(*tile_starts(shape_zyx, patch_zyx, step_size)):
        yield tuple(slice(s, s + p) for s, p in zip(start, patch_zyx, strict=True))


def fitted_patch(shape_zyx: tuple[int, ...], patch_zyx: tuple[int, ...],
                 divisor_zyx: tuple[int, ...]) -> tuple[int, ...]:
    """The model's patch, shrunk along each axis where the image is smaller than it to the smallest
    size that covers the image and that the network's strides divide. The same tiles then hold
    less zero padding and cost less; instance normalisation sees less padding too, so logits near
    such an image's border change slightly (measured in docs/benchmarks.md)."""
    return tuple(min(p, -(-s // d) * d) for s, p, d in zip(shape_zyx, patch_zyx, divisor_zyx, strict=True))


def count_tiles(shape_zyx: tuple[int, ...], patch_zyx: tuple[int, ...], step_size: float) -> int:
    padded = [max(s, p) for s, p in zip(shape_zyx, patch_zyx, strict=True)]
    return int(np.prod([len(s) for s in tile_starts(tuple(padded), patch_zyx, step_size)]))


def _predict_tile(backend: Backend, tile: np.ndarray, mirroring: bool) -> np.ndarray:
    logits = backend.predict(tile)[0]
    if not mirroring:
        return logits
    total = np.array(logits, dtype=np.float32)
    flips = [axes for n in (1, 2, 3) for axes in itertools.combinations((2, 3, 4), n)]
    for axes in flips:
        flipped = np.ascontiguousarray(np.flip(tile, axes))
        total += np.flip(backend.predict(flipped)[0], tuple(a - 1 for a in axes))
    return total / (len(flips) + 1)


ACCUMULATE = ("host", "device")


def predict_logits(
    data: np.ndarray,
    backend: Backend,
    *,
    step_size: float = 0.5,
    mirroring: bool = False,
    on_tile: Callable[[int, int], None] | None = None,
    accumulate: str = "host",
) -> np.ndarray:
    """Sliding-window logits of a preprocessed (c, z, y, x) array.

    step_size: tile step as a fraction of the patch (0.5 = nnU-Net default).
    mirroring: average over the 7 flips of the three axes too (8x the work).
    on_tile: called as on_tile(done, total) after each tile, for progress reporting.
    accumulate: 'host' sums the weighted tiles in NumPy; 'device' sums them in torch on the
        backend's device (a GPU: no logits cross the bus per tile), for backends with
        `predict_tensor` and `device` (TorchBackend). `TorchBackend.accumulation_place` says which fits.
    Returns (k, z, y, x) float32 logits on the unpadded grid, in host memory.
    """
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
    patch = tuple(backend.patch_zyx)
    padded, undo = pad_to_patch(np.asarray(data, dtype=np.float32), patch)
    slicers = list(tiles(padded.shape[1:], patch, step_size))
    if accumulate == "device":
        return _accumulate_on_device(padded, undo, backend, slicers, mirroring, on_tile)
    shape = padded.shape[1:]
    weights = gaussian_importance(patch)
    # float32, not nnU-Net's float16: in float16, products with the tiny weights at tile corners
    # fall below its range, which costs nnU-Net up to 2 % of the largest logit at image corners.
    accumulated = np.zeros((backend.num_classes, *shape), dtype=np.float32)
    weight_sum = np.zeros(shape, dtype=np.float32)
    for done, region in enumerate(slicers, start=1):
        tile = np.ascontiguousarray(padded[(slice(None), *region)])[None]
        logits = _predict_tile(backend, tile, mirroring)
        logits *= weights
        accumulated[(slice(None), *region)] += logits
        weight_sum[region] += weights
        if on_tile is not None:
            on_tile(done, len(slicers))
    out = accumulated[undo]
    out /= weight_sum[undo[1:]]
    return out


def _accumulate_on_device(padded: np.ndarray, undo: tuple[slice, ...], backend, slicers: list[tuple[slice, ...]],
                          mirroring: bool, on_tile: Callable[[int, int], None] | None) -> np.ndarray:
    """The same weighted sum as the host path, in torch on the backend's device, over a rolling band
    of one patch depth: tiles come in z order, so once the next row of tiles starts at z0 every
    slice above z0 is final; it is divided by its weights, sent to host memory once, and the band
    moves down. Device memory is (k + 1) band volumes whatever the scan's length (a 1000-slice
    whole-body CT included), and no logits cross the bus per tile. The input stays on the host."""
    import torch

    device, k = backend.device, backend.num_classes
    depth = int(backend.patch_zyx[0])
    shape = padded.shape[1:]
    out = np.empty((k, *shape), dtype=np.float32)
    flips = [axes for n in (1, 2, 3) for axes in itertools.combinations((2, 3, 4), n)] if mirroring else []
    # inference mode: the backend returns inference tensors, and summing them in place needs it
    with torch.inference_mode():
        weights = torch.from_numpy(gaussian_importance(tuple(backend.patch_zyx)).copy()).to(device)
        band = torch.zeros((k, depth, *shape[1:]), dtype=torch.float32, device=device)
        band_weights = torch.zeros((depth, *shape[1:]), dtype=torch.float32, device=device)
        source = torch.from_numpy(padded)
        top = 0  # the z of band[:, 0]

        def flush(stop: int) -> None:  # slices top..stop are final: out, then shift the band up
            n = stop - top
            out[:, top:stop] = (band[:, :n] / band_weights[:n]).cpu().numpy()
            band[:, : depth - n] = band[:, n:].clone()
            band[:, depth - n:] = 0
            band_weights[: depth - n] = band_weights[n:].clone()
            band_weights[depth - n:] = 0

        for done, region in enumerate(slicers, start=1):
            z0 = region[0].start
            if z0 > top:
                flush(z0)
                top = z0
            tile = source[(slice(None), *region)][None].to(device, non_blocking=True)
            logits = backend.predict_tensor(tile)[0]
            for axes in flips:
                logits += torch.flip(backend.predict_tensor(torch.flip(tile, axes))[0], [a - 1 for a in axes])
            if flips:
                logits /= len(flips) + 1
            local = (slice(0, depth), *region[1:])
            band[(slice(None), *local)] += logits * weights
            band_weights[local] += weights
            if on_tile is not None:
                on_tile(done, len(slicers))
        flush(shape[0])
    return out[undo]
