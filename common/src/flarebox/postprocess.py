"""Postprocess: clean-up on the original grid, after export and before writing.

Three rules, all off by default and set in a task's `[postprocess]` section:

- closing: each label is closed (dilated, then eroded) with a (2r + 1)^3 cube, r = `closing`:
  gaps and holes up to 2r voxels across fill, as the lightweight Task 2 entry's 3x3x3 closing does
  after its 2.5D network, whose slices are segmented one by one. Only background is filled: no label
  takes another's voxels. Each label is closed in its own bounding box.
- minimum component size: connected components (26-connectivity) of a label smaller than
  `min_component_mm3` are set to background. Small isolated detections are the commonest false
  positives of whole-body lesion models, and FLARE's lesion DSC punishes them on lesion-free cases.
- organ gating: a component is kept only if some voxel of it lies within `margin_mm` of a mask
  (e.g. the organs an organ model finds, see `Predictor`'s gate). Distances are measured in mm with
  the image's spacing, in a box around each component only, so gating stays cheap on 1000-slice scans.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def components(mask: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """26-connected components of a boolean mask: (component ids, bounding box of each id - 1)."""
    ids, count = ndimage.label(mask, structure=_CONNECTIVITY_26)
    return ids, list(ndimage.find_objects(ids, max_label=count))


def close_labels(labels: np.ndarray, radius: int) -> np.ndarray:
    """labels with every label closed by a (2 * radius + 1)^3 cube, filling background only (a new
    array; the same one when radius is 0). Labels are closed in increasing order: where two would
    fill the same background voxel, the lower takes it."""
    if radius <= 0:
        return labels
    out = labels.copy()
    structure = np.ones((2 * radius + 1,) * 3, dtype=bool)
    reach = 2 * radius  # dilation reaches r beyond the label; a margin of 2r keeps erosion off the box's edge
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - reach, 0), min(b.stop + reach, n)) for b, n in zip(box, labels.shape,
                                                                                             strict=True))
        mask = np.pad(labels[grown] == index, reach)  # outside the image counts as not this label
        closed = ndimage.binary_closing(mask, structure)[(slice(reach, -reach),) * 3]
        region = out[grown]  # a view: basic slicing
        region[closed & (region == 0)] = index
    return out


def remove_small_components(labels: np.ndarray, spacing_zyx_mm: tuple[float, float, float], min_volume_mm3: float,
                            label: int = 1) -> np.ndarray:
    """labels with the components of `label` under `min_volume_mm3` set to 0 (a new array)."""
    out = labels.copy()
    if min_volume_mm3 <= 0:
        return out
    ids, _ = components(labels == label)
    if ids.max() == 0:
        return out
    voxel_mm3 = float(np.prod(spacing_zyx_mm))
    sizes = np.bincount(ids.ravel())
    small = np.flatnonzero(sizes * voxel_mm3 < min_volume_mm3)
    small = small[small > 0]
    out[np.isin(ids, small)] = 0
    return out


def gate_by_mask(labels: np.ndarray, mask: np.ndarray, spacing_zyx_mm: tuple[float, float, float], margin_mm: float,
                 label: int = 1) -> np.ndarray:
    """labels with the components of `label` farther than `margin_mm` from `mask` set to 0."""
    if labels.shape != mask.shape:
        raise ValueError(f"gate mask shape {mask.shape} differs from the labels' {labels.shape}")
    out = labels.copy()
    ids, boxes = components(labels == label)
    reach = [int(np.ceil(margin_mm / s)) for s in spacing_zyx_mm]
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - r, 0), min(b.stop + r, n)) for b, r, n in zip(box, reach, labels.shape,
                                                                                         strict=True))
        near, member = mask[grown], ids[grown] == index
        # distance (mm) from every voxel of the box to the nearest mask voxel in it
        if not near.any() or ndimage.distance_transform_edt(~near, sampling=spacing_zyx_mm)[member].min() > margin_mm:
            out[grown][member] = 0  # a view: basic slicing, so only the box is touched
    return out
