"""Locate: a coarse pass finds the box that holds the target organs; the fine tiles cover only it.

Most of a long CT holds none of the 13 abdominal organs (thorax, pelvis, legs), and the body crop
removes air only. With `[locate]` set, each case is first segmented at a coarse spacing, the box of
the target labels found there is grown by a margin in mm, and preprocessing crops the scan to it:
the organ model's tiles cover the box, and every voxel outside it is background on export.

Two ways to locate (`[locate] mode`):
- "network": a small locator model of its own (an nnU-Net model folder trained at 4-6 mm, e.g. by
  `flarebox-tools demo --task locator`), f32 by default: a few milliseconds of network per case.
- "model": the organ model itself, on the image coarsened `coarsen` times beyond its plan's spacing:
  a user's nnU-Net folder needs nothing extra, at the price of one more pass of the large network
  (on a grid `coarsen`^3 times smaller).

The coarse pass reads a strided view of the scan (every k-th voxel, k = the coarse spacing over the
scan's, at least 1) before preprocessing it like any case (body crop, normalisation, resampling):
the full-resolution scan is never normalised or resampled for it.

Each label keeps its major connected components only (a fifth of its largest or more), so a stray
blob far from the organs does not stretch the box. Safe by construction: a side of the box that
comes within one coarse voxel of the scan's edge goes to the edge; no target voxel, or a box smaller
than `min_size_mm` along an axis, falls back to the whole scan (the body crop still applies).
`Located.note` says which, for the case's progress line. With `axes = "z"` the box keeps whole
slices and crops along z only (a 2.5D network must see the slices it was trained on).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass

import numpy as np

from flarebox.backends import Backend
from flarebox.config import LocateConfig
from flarebox.models import ModelPlan
from flarebox.preprocess import Preprocessed, preprocess
from flarebox.sliding_window import fitted_patch, predict_logits

Box = tuple[tuple[int, int], ...]  # [start, stop) per axis of the scan's own (z, y, x) array


@dataclass(frozen=True)
class Located:
    box: Box | None  # None: the whole scan
    note: str  # for the progress line: the box and the share of the scan it keeps, or why none


def coarse_plan(plan: ModelPlan, coarsen: float) -> ModelPlan:
    """The organ model's plan at `coarsen` times its spacing (mode "model")."""
    return dataclasses.replace(plan, spacing_zyx_mm=tuple(s * coarsen for s in plan.spacing_zyx_mm))


def strides_for(spacing_zyx_mm: tuple[float, ...], plan: ModelPlan) -> tuple[int, int, int]:
    """Per scan axis, how many voxels the coarse pass may skip: the coarse spacing over the scan's."""
    target = [0.0, 0.0, 0.0]
    for transposed, axis in enumerate(plan.transpose_forward):
        target[axis] = plan.spacing_zyx_mm[transposed]
    return tuple(max(1, int(t / s + 1e-6)) for t, s in zip(target, spacing_zyx_mm, strict=True))


MAJOR_COMPONENT = 0.2  # a label's components of at least this share of its largest count; smaller ones are strays


def major_components(labels: np.ndarray, targets: tuple[int, ...]) -> np.ndarray:
    """The voxels of the target labels (every foreground label when none are named) that belong to
    a major component of their label: a stray blob far from the organ must not stretch the box. An
    organ the coarse pass splits in two keeps both halves where the smaller is a fifth of the larger."""
    from scipy import ndimage  # the locate stage only

    mask = np.zeros(labels.shape, bool)
    for label in targets or tuple(int(v) for v in np.unique(labels) if v > 0):
        parts, count = ndimage.label(labels == label)
        if count == 0:
            continue
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        mask |= (sizes >= MAJOR_COMPONENT * sizes.max())[parts] & (parts > 0)
    return mask


def _found_box(labels: np.ndarray, targets: tuple[int, ...]) -> Box | None:
    """[start, stop) of the target labels' major components on the coarse grid; None when there are none."""
    mask = major_components(labels, targets)
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not hits.size:
            return None
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def to_scan_box(coarse: Box, pre: Preprocessed, strides_zyx: tuple[int, ...]) -> Box:
    """A box on the coarse network grid as voxels of the scan: through the resampling (each coarse
    voxel covers crop/grid voxels of the strided scan), the crop, the transpose and the strides (a
    strided voxel samples scan voxel s*k; what lies between two samples is kept)."""
    strided = []
    for (lo, hi), (b0, b1), m in zip(coarse, pre.bbox, pre.data.shape[1:], strict=True):
        ratio = (b1 - b0) / m
        strided.append((b0 + math.floor(lo * ratio), b0 + min(math.ceil(hi * ratio), b1 - b0)))
    in_scan_axes = [strided[pre.transpose_backward[a]] for a in range(3)]
    return tuple((max(0, lo * k - (k - 1)), hi * k) for (lo, hi), k in zip(in_scan_axes, strides_zyx, strict=True))


def grow(box: Box, shape_zyx: tuple[int, ...], spacing_zyx_mm: tuple[float, ...], margin_mm: float,
         edge_zyx: tuple[int, ...]) -> Box:
    """The box grown by `margin_mm` and clipped to the scan; a side within `edge_zyx` voxels (one
    coarse voxel) of the scan's edge goes to the edge: an organ the scan cuts is kept whole."""
    out = []
    for (lo, hi), n, s, edge in zip(box, shape_zyx, spacing_zyx_mm, edge_zyx, strict=True):
        m = math.ceil(margin_mm / s)
        lo = 0 if lo <= edge else max(lo - m, 0)
        hi = n if hi >= n - edge else min(hi + m, n)
        out.append((lo, hi))
    return tuple(out)


class Locator:
    """The coarse pass: a model (plan at the coarse spacing + backend) and the [locate] settings."""

    def __init__(self, plan: ModelPlan, backend: Backend, settings: LocateConfig, *, resampler: str = "auto",
                 body_threshold: float | None = None, body_margin_mm: float = 10.0, step_size: float = 0.75) -> None:
        # scipy.ndimage (components, below) takes ~0.2-0.4 s to import: now, while the first case is
        # read (run_folder builds the predictor meanwhile), not in the first case's time
        importlib.import_module("scipy.ndimage")
        self.plan, self.backend, self.settings = plan, backend, settings
        self.resampler, self.body_threshold, self.body_margin_mm = resampler, body_threshold, body_margin_mm
        self.step_size = step_size

    def tile_backend(self, shape_zyx: tuple[int, ...]) -> Backend:
        """Coarse images are small: the tile is always fitted to them."""
        return self.backend.for_patch(fitted_patch(shape_zyx, self.plan.patch_zyx, self.plan.patch_divisor_zyx))

    def coarse_labels(self, image_zyx: np.ndarray, spacing_zyx_mm: tuple[float, ...]
                      ) -> tuple[np.ndarray, Preprocessed, tuple[int, ...]]:
        """Labels on the coarse grid, how it was made, and the strides taken from the scan."""
        strides = strides_for(spacing_zyx_mm, self.plan)
        view = image_zyx[tuple(slice(None, None, k) for k in strides)]
        spacing = tuple(s * k for s, k in zip(spacing_zyx_mm, strides, strict=True))
        pre = preprocess(view, spacing, self.plan, resampler=self.resampler, body_threshold=self.body_threshold,
                         body_margin_mm=self.body_margin_mm)
        labels = predict_logits(pre.data, self.tile_backend(pre.data.shape[1:]), step_size=self.step_size,
                                labels=True, pad_values=pre.pad_values)
        return labels, pre, strides

    def locate(self, image_zyx: np.ndarray, spacing_zyx_mm: tuple[float, ...]) -> Located:
        labels, pre, strides = self.coarse_labels(image_zyx, spacing_zyx_mm)
        return decide(labels, pre, strides, tuple(image_zyx.shape), spacing_zyx_mm, self.settings)


def decide(labels: np.ndarray, pre: Preprocessed, strides_zyx: tuple[int, ...], shape_zyx: tuple[int, ...],
           spacing_zyx_mm: tuple[float, ...], settings: LocateConfig) -> Located:
    """The box to keep, from the coarse labels: the target labels' box on the scan, grown, or the
    whole scan when there is none or it is implausibly small."""
    found = _found_box(labels, settings.labels)
    if found is None:
        return Located(None, "whole scan: the locator found no organ")
    box = to_scan_box(found, pre, strides_zyx)
    extent_mm = [(hi - lo) * sp for (lo, hi), sp in zip(box, spacing_zyx_mm, strict=True)]
    if min(extent_mm) < settings.min_size_mm:
        return Located(None, f"whole scan: the located box ({' x '.join(f'{e:.0f}' for e in extent_mm)} mm) is "
                             f"smaller than {settings.min_size_mm:g} mm")
    coarse_mm = [pre.spacing_zyx_mm[pre.transpose_backward[a]] for a in range(3)]
    coarse_voxel = tuple(max(1, math.ceil(c / sp)) for c, sp in zip(coarse_mm, spacing_zyx_mm, strict=True))
    box = grow(box, shape_zyx, spacing_zyx_mm, settings.margin_mm, coarse_voxel)
    if settings.axes == "z":
        box = (box[0], (0, shape_zyx[1]), (0, shape_zyx[2]))
    kept = math.prod(hi - lo for lo, hi in box) / max(1, math.prod(shape_zyx))
    where = " ".join(f"{axis} {lo}:{hi}" for axis, (lo, hi) in zip("zyx", box, strict=True))
    return Located(box, f"box {where} ({kept:.0%} of the scan)")
