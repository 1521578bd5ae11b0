"""Preprocess: nnU-Net v2 semantics for one image, ready for sliding-window inference.

In:  a (z, y, x) float32 volume and its spacing. Out: a (c, z, y, x) float32 array at the model's
spacing plus what export needs to undo every step. The steps, in nnU-Net's order: transpose axes by
the plans' `transpose_forward`; crop to the bounding box of nonzero voxels; normalise (CT: clip to
the foreground percentiles, subtract mean, divide std; or z-score); resample to the target spacing
(new shape = round(old spacing / new spacing * shape)). The 3D-CPS forced-spacing rule (FLARE 2022)
is an option that changes the target spacing by slice count. A model whose plan reads MIND-SSC
features (Task 3's zero-shot mode, `flarebox.mind`) gets its 12 descriptor channels computed from the
normalised, resampled image as the last step: at the model's spacing, as in training.

One step nnU-Net lacks, optional: crop a CT to the body (voxels above a threshold in HU, plus a
margin) before normalising. nnU-Net's nonzero crop never crops a CT (air is -1000, not 0), so the
network otherwise spends tiles on air around the patient; export puts background there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flarebox.mind import MIND_CHANNELS
from flarebox.models import ModelPlan, Normalization
from flarebox.resample import resize_linear

PadValues = tuple[tuple[float, float], ...]  # per spatial axis: (before, after)
NNUNET_PADDING: PadValues = ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))  # zeros, the normalised mean

@dataclass(frozen=True)
class Preprocessed:
    data: np.ndarray  # (c, z, y, x) float32 at target spacing, transposed axes
    shape_original_zyx: tuple[int, int, int]  # before transpose
    shape_before_crop: tuple[int, int, int]  # after transpose
    bbox: tuple[tuple[int, int], ...]  # crop box in transposed axes, [start, stop)
    spacing_zyx_mm: tuple[float, float, float]  # target spacing used
    transpose_backward: tuple[int, int, int]
    # What the network should see beyond the data where a tile overhangs it, per axis and side:
    # nnU-Net pads with 0 (beyond the scan, where the body goes on, 0 is water-like after CT
    # normalisation: a fair guess). Beyond a side the body crop cut, though, the scan holds air, so
    # that side is padded with the crop's normalised minimum (air).
    pad_values: PadValues = NNUNET_PADDING


def forced_spacing(
    spacing_zyx_mm: tuple[float, float, float], default_zyx_mm: tuple[float, float, float], n_slices: int
) -> tuple[float, float, float]:
    """3D-CPS rule: keep thin-slice stacks' z for short scans, coarsen z for very long ones."""
    z, y, x = default_zyx_mm
    if n_slices < 150:
        return (spacing_zyx_mm[0], y, x)
    if n_slices <= 600:
        return (z, y, x)
    return (max(0.8, 600.0 / n_slices) * z, y, x)


def _box(zy: np.ndarray, x_hits: Callable[[slice, slice], np.ndarray]) -> tuple[tuple[int, int], ...] | None:
    """[start, stop) of the marked voxels along each axis of a 3D grid; None when none is marked.
    Two passes: z and y from the (z, y) projection `zy`, then x from `x_hits(z, y)`, the x
    projection of the z-y box only."""
    z_hits = np.flatnonzero(zy.any(axis=1))
    if not z_hits.size:
        return None
    y_hits = np.flatnonzero(zy.any(axis=0))
    z, y = slice(int(z_hits[0]), int(z_hits[-1]) + 1), slice(int(y_hits[0]), int(y_hits[-1]) + 1)
    x = np.flatnonzero(x_hits(z, y))
    return ((z.start, z.stop), (y.start, y.stop), (int(x[0]), int(x[-1]) + 1))


def nonzero_bbox(data: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box of voxels that are nonzero in any channel (the whole image when none is).
    Filling holes (as nnU-Net does for its mask) never changes a bounding box, so it is skipped.
    When each of the six faces holds a nonzero voxel (any CT: air is -1000) the box is the whole
    image, which the faces alone tell."""
    whole = tuple((0, n) for n in data.shape[1:])
    if all(np.take(data, end, axis=axis).any() for axis in (1, 2, 3) for end in (0, -1)):
        return whole
    mask = np.any(data != 0, axis=0)
    return _box(mask.any(axis=2), lambda z, y: mask[z, y].any(axis=(0, 1))) or whole


def above(image: np.ndarray, threshold: float) -> np.ndarray:
    """image > threshold, compared in the image's own type: an int16 CT is not widened to float64
    (which comparing with a Python float would do)."""
    if np.issubdtype(image.dtype, np.integer):
        info, floor = np.iinfo(image.dtype), math.floor(threshold)
        if floor < info.min:
            return np.ones(image.shape, dtype=bool)
        return image > image.dtype.type(min(floor, info.max))  # integers: x > t exactly when x > floor(t)
    return image > threshold


def _peak(image: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """The maximum along `axis`, NaN ignored: `_peak(image) > t` is `(image > t).any()` without a
    mask of the whole image."""
    return np.fmax.reduce(image, axis=axis) if image.dtype.kind == "f" else np.max(image, axis=axis)


def body_bbox(image_zyx: np.ndarray, threshold: float, margin_zyx: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """Bounding box of voxels above `threshold`, grown by `margin_zyx` voxels and clipped to the
    image; the whole image when none is above it. Found from maxima (over x, then over the z-y box),
    never a mask of the whole image, whose first-touched pages cost more than the search."""
    box = _box(above(_peak(image_zyx, 2), threshold),
               lambda z, y: above(_peak(image_zyx[z, y], (0, 1)), threshold))
    if box is None:
        return tuple((0, n) for n in image_zyx.shape)
    return tuple((max(a - m, 0), min(b + m, n)) for (a, b), m, n in zip(box, margin_zyx, image_zyx.shape,
                                                                        strict=True))


def normalize(data: np.ndarray, norm: Normalization, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one channel in place (float32), nnU-Net's formulas and epsilons."""
    if norm.scheme == "CTNormalization":
        np.clip(data, norm.clip_low, norm.clip_high, out=data)
        data -= np.float32(norm.mean)
        data /= np.float32(max(norm.std, 1e-8))
    elif norm.scheme == "ZScoreNormalization":
        values = data[mask] if mask is not None else data
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        data -= np.float32(mean)
        data /= np.float32(max(std, 1e-8))
        if mask is not None:
            data[~mask] = 0
    elif norm.scheme == "RescaleTo01Normalization":
        low, high = float(data.min()), float(data.max())
        data -= np.float32(low)
        data /= np.float32(max(high - low, 1e-8))
    return data


SLAB_SLICES = 32


def _ct_by_slabs(crop: np.ndarray, norm: Normalization, shape: tuple[int, int, int], resampler: str) -> np.ndarray:
    """CT normalisation is per voxel, so the crop is made float32, normalised and resampled in-plane
    a slab of slices at a time (no float32 copy of the whole crop ever exists, and the slab's
    buffers are reused), then resampled along the first axis. Returns (1, *shape)."""
    planes = np.empty((crop.shape[0], *shape[1:]), dtype=np.float32)
    for start in range(0, crop.shape[0], SLAB_SLICES):
        slab = np.array(crop[start:start + SLAB_SLICES], dtype=np.float32)
        normalize(slab, norm)
        planes[start:start + len(slab)] = resize_linear(slab, (len(slab), *shape[1:]), engine=resampler)
    return resize_linear(planes, shape, engine=resampler)[None]


def target_shape(
    shape_zyx: tuple[int, ...], spacing_zyx_mm: tuple[float, ...], target_zyx_mm: tuple[float, ...]
) -> tuple[int, int, int]:
    return tuple(int(round(s / t * n)) for n, s, t in zip(shape_zyx, spacing_zyx_mm, target_zyx_mm, strict=True))


def preprocess(
    image_zyx: np.ndarray,
    spacing_zyx_mm: tuple[float, float, float],
    plan: ModelPlan,
    *,
    use_forced_spacing: bool = False,
    resampler: str = "auto",
    body_threshold: float | None = None,
    body_margin_mm: float = 10.0,
    device: str = "cpu",
    on_shape: Callable[[tuple[int, int, int]], None] | None = None,
    roi_zyx: tuple[tuple[int, int], ...] | None = None,
) -> Preprocessed:
    """Transpose, crop, normalise and resample one single-channel image for `plan`'s network.

    image_zyx: any real voxel type (int16 for most CT), left unchanged: float32 is made of its crop.
    use_forced_spacing: apply the 3D-CPS slice-count rule to the plan's spacing.
    resampler: 'auto' (torch when already loaded, else NumPy), 'torch' or 'numpy'.
    body_threshold: crop further to voxels above this raw intensity (CT: HU, e.g. -500), grown by
        body_margin_mm; None keeps nnU-Net's nonzero crop only.
    device: where MIND-SSC features are computed, for a plan that reads them (cpu or cuda).
    on_shape: called with the network input's (z, y, x) shape as soon as the crop tells it, before
        the voxel work (the pipeline compiles a tile shape for it meanwhile).
    roi_zyx: [start, stop) per axis of `image_zyx`: only this box is preprocessed (the located
        organs, locate.py), the crops above applying within it; export puts background around it.
    """
    mind = plan.input_features == "mind"
    if plan.num_input_channels != (MIND_CHANNELS if mind else 1):
        raise ValueError(f"{plan.folder}: a {plan.input_features} model with {plan.num_input_channels} input "
                         "channels is not supported")
    tf = plan.transpose_forward
    data = np.transpose(image_zyx, tf)[None]
    spacing = tuple(spacing_zyx_mm[a] for a in tf)
    shape_before_crop = tuple(data.shape[1:])

    roi = ((0, n) for n in data.shape[1:]) if roi_zyx is None else (roi_zyx[a] for a in tf)
    roi = tuple((max(0, a), min(n, b)) for (a, b), n in zip(roi, data.shape[1:], strict=True))
    data = data[(slice(None), *(slice(a, b) for a, b in roi))]
    bbox = nonzero_bbox(data)
    cut = ((False, False),) * 3  # per axis and side: did the body crop cut the scan there?
    if body_threshold is not None:
        inner = data[(0, *(slice(a, b) for a, b in bbox))]
        margin = tuple(int(np.ceil(body_margin_mm / s)) for s in spacing)
        body = body_bbox(inner, body_threshold, margin)
        cut = tuple((c > 0, d < n) for (c, d), n in zip(body, inner.shape, strict=True))
        bbox = tuple((a + c, a + d) for (a, _), (c, d) in zip(bbox, body, strict=True))
    data = data[(slice(None), *(slice(a, b) for a, b in bbox))]
    bbox = tuple((a + r, b + r) for (a, b), (r, _) in zip(bbox, roi, strict=True))
    target = plan.spacing_zyx_mm
    if use_forced_spacing:
        target = forced_spacing(spacing, target, image_zyx.shape[0])
    new_shape = target_shape(data.shape[1:], spacing, target)
    if on_shape is not None:
        on_shape(new_shape)
    norm = plan.normalizations[0]
    pad_values = NNUNET_PADDING
    if norm.scheme == "CTNormalization" and any(map(any, cut)) and data.size:
        lowest = np.clip(np.float32(data.min()), norm.clip_low, norm.clip_high)
        air = float((lowest - np.float32(norm.mean)) / np.float32(max(norm.std, 1e-8)))
        pad_values = tuple(tuple(air if side else 0.0 for side in sides) for sides in cut)
    if norm.scheme == "CTNormalization" and not plan.use_mask_for_norm[0]:
        data = _ct_by_slabs(data[0], norm, new_shape, resampler)
    else:
        data = np.array(data, dtype=np.float32, order="C")  # own a contiguous copy before in-place work
        mask = None
        if plan.use_mask_for_norm[0]:
            from scipy import ndimage  # here only: the CT path never needs scipy

            mask = ndimage.binary_fill_holes(data[0] != 0)
        normalize(data[0], norm, mask)
        data = resize_linear(data, new_shape, engine=resampler)
    if mind:
        from flarebox.mind import mind_ssc_numpy

        data = mind_ssc_numpy(data[0], target, device=device)
    return Preprocessed(
        data=data,
        shape_original_zyx=tuple(image_zyx.shape),
        shape_before_crop=shape_before_crop,
        bbox=bbox,
        spacing_zyx_mm=target,
        transpose_backward=plan.transpose_backward,
        pad_values=pad_values,
    )
