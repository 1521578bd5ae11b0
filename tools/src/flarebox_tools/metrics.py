"""FLARE evaluation: Dice (DSC) and normalised surface Dice (NSD) per class, with the organisers' rules.

In: label maps (z, y, x) on one voxel grid and its spacing; out: {class: {"dsc", "nsd"}}. Follows the
organisers' evaluation scripts (FLARE22-24) and DeepMind's surface-distance method for NSD:

- NSD tolerance in mm per organ label 1..13: 5 3 3 5 2 2 2 2 2 3 5 7 3; 2 mm for lesions.
- Both masks empty -> DSC = NSD = 1; ground truth empty, prediction not -> 0; DSC < 0.2 -> NSD = 0.
- Aorta (5), IVC (6) and esophagus (10) are scored on the ground truth's axial slices [zmin, zmax)
  only (its upper slice excluded), cut from both masks. Where that range is empty (the organ is on one
  slice) nothing is left to score: NaN, as the organisers' script gives on NumPy 1 (it crashes on 2).
- NSD: surface elements sit on the corner grid between voxels; each gets the area of its 2x2x2
  neighbourhood's marching-cubes patch (vertices on edge midpoints, scaled by the spacing), and the
  Euclidean distance (in mm) to the other mask's nearest surface element. NSD = area within the
  tolerance over the total area, both surfaces together.

The area table is derived here, not copied: it equals DeepMind's for every code and spacing when an
ambiguous face keeps the minority corners apart (the set ones on a 4:4 tie) and each patch polygon is
split into the triangles of largest total area (tests/test_metrics.py checks this against the package).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

ORGAN_NAMES = ("liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava", "right_adrenal_gland",
               "left_adrenal_gland", "gallbladder", "esophagus", "stomach", "duodenum", "left_kidney")
ORGAN_TOLERANCE_MM = dict(zip(range(1, 14), (5.0, 3.0, 3.0, 5.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 5.0, 7.0, 3.0),
                              strict=True))
LESION_TOLERANCE_MM = 2.0
GT_SLAB_LABELS = frozenset({5, 6, 10})  # aorta, IVC, esophagus: scored on the ground truth's slices only
TASKS = ("organs", "lesion")

Spacing = Sequence[float]


def dice(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """2|P∩G| / (|P| + |G|); 1.0 when both are empty (FLARE's rule)."""
    pred, gt = np.asarray(pred_mask, bool), np.asarray(gt_mask, bool)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & gt)) / total


# ---- surface elements -----------------------------------------------------------------------------

# Cube corner i is (z, y, x) = bits of i; its bit in the neighbourhood code is 7 - i, as in DeepMind's
# kernel [[[128, 64], [32, 16]], [[8, 4], [2, 1]]] applied with a one-voxel offset.
_CORNERS = np.array([((i >> 2) & 1, (i >> 1) & 1, i & 1) for i in range(8)])


def _face_cycles() -> list[list[int]]:
    """The six cube faces, each as its four corners in cyclic order."""
    cycles = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for side in (0, 1):
            cycle = []
            for cu, cv in ((0, 0), (0, 1), (1, 1), (1, 0)):
                corner = [0, 0, 0]
                corner[axis], corner[u], corner[v] = side, cu, cv
                cycle.append(int(corner[0] * 4 + corner[1] * 2 + corner[2]))
            cycles.append(cycle)
    return cycles


def _patch_polygons(inside: Sequence[bool]) -> list[list[tuple[int, int]]]:
    """The marching-cubes patch of one 2x2x2 neighbourhood as closed polygons of cube edges (a, b)."""
    keep_apart = sum(inside) <= 4  # on an ambiguous face, keep the minority corners apart
    segments = []
    for cycle in _face_cycles():
        edges = [tuple(sorted((cycle[k], cycle[(k + 1) % 4]))) for k in range(4)]
        crossed = [(a, b) for a, b in edges if inside[a] != inside[b]]
        if len(crossed) == 2:
            segments.append((crossed[0], crossed[1]))
        elif len(crossed) == 4:
            # the face's corners alternate; pair the two edges around each corner to be cut off
            start = 0 if inside[cycle[0]] == keep_apart else 1
            first = cycle[start]
            around = [e for e in crossed if first in e]
            others = [e for e in crossed if first not in e]
            segments += [tuple(around), tuple(others)]
    polygons = []
    while segments:
        polygon = list(segments.pop())
        while True:
            k = next(k for k, s in enumerate(segments) if polygon[-1] in s)
            a, b = segments.pop(k)
            following = b if a == polygon[-1] else a
            if following == polygon[0]:
                break
            polygon.append(following)
        polygons.append(polygon)
    return polygons


def _triangulations(n: int) -> list[list[tuple[int, int, int]]]:
    """Every triangulation of a polygon with vertices 0..n-1."""

    def split(vertices: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
        if len(vertices) < 3:
            return [[]]
        first, last = vertices[0], vertices[-1]
        return [left + right + [(first, vertices[k], last)]
                for k in range(1, len(vertices) - 1)
                for left in split(vertices[: k + 1]) for right in split(vertices[k:])]

    return split(tuple(range(n)))


@functools.cache
def _triangle_area_vectors() -> tuple[np.ndarray, np.ndarray]:
    """For every neighbourhood code, the area vectors (z, y, x; unit voxels) of its patch triangles:
    returns (code per triangle, vectors)."""
    codes, vectors = [], []
    for code in range(1, 255):
        inside = [bool((code >> (7 - i)) & 1) for i in range(8)]
        for polygon in _patch_polygons(inside):
            points = np.array([(_CORNERS[a] + _CORNERS[b]) / 2.0 for a, b in polygon])
            candidates = []
            for triangles in _triangulations(len(points)):
                a, b, c = (points[list(vertex)] for vertex in zip(*triangles, strict=True))
                area_vectors = 0.5 * np.cross(b - a, c - a)
                candidates.append((float(np.linalg.norm(area_vectors, axis=1).sum()), area_vectors))
            best = max(candidates, key=lambda c: c[0])[1]
            codes += [code] * len(best)
            vectors.append(best)
    return np.array(codes), np.concatenate(vectors)


@functools.lru_cache(maxsize=64)
def _area_table(spacing_zyx_mm: tuple[float, float, float]) -> np.ndarray:
    """Surface area (mm^2) of the patch of each of the 256 neighbourhood codes."""
    codes, vectors = _triangle_area_vectors()
    sz, sy, sx = spacing_zyx_mm
    # an area vector scales by the cofactors of diag(spacing): each component by the other two spacings
    scaled = vectors * np.array([sy * sx, sz * sx, sz * sy])
    return np.bincount(codes, weights=np.linalg.norm(scaled, axis=1), minlength=256)


def _neighbourhood_codes(mask: np.ndarray) -> np.ndarray:
    """The 8-bit code of every 2x2x2 neighbourhood, on the (n+1)^3 corner grid of an (n)^3 mask."""
    padded = np.pad(mask.astype(np.uint8), 1)
    nz, ny, nx = (s - 1 for s in padded.shape)
    codes = np.zeros((nz, ny, nx), np.uint8)
    for i, (dz, dy, dx) in enumerate(_CORNERS):
        codes |= padded[dz : dz + nz, dy : dy + ny, dx : dx + nx] << np.uint8(7 - i)
    return codes


def _union_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    return ndimage.find_objects((pred | gt).astype(np.uint8))[0]


def _surface_dice(pred: np.ndarray, gt: np.ndarray, spacing_zyx_mm: tuple[float, float, float],
                  tolerance_mm: float) -> float:
    """NSD of two non-empty boolean masks, on the grid given (no cropping)."""
    table = _area_table(spacing_zyx_mm)
    code_pred, code_gt = _neighbourhood_codes(pred), _neighbourhood_codes(gt)
    surface_pred = (code_pred != 0) & (code_pred != 255)
    surface_gt = (code_gt != 0) & (code_gt != 255)
    # distance from every corner to the nearest surface element of the other mask, in mm
    to_gt = ndimage.distance_transform_edt(~surface_gt, sampling=spacing_zyx_mm)
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing_zyx_mm)
    area_pred, area_gt = table[code_pred[surface_pred]], table[code_gt[surface_gt]]
    within = area_pred[to_gt[surface_pred] <= tolerance_mm].sum() + area_gt[to_pred[surface_gt] <= tolerance_mm].sum()
    return float(within / (area_pred.sum() + area_gt.sum()))


def _spacing(spacing_zyx_mm: Spacing) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_zyx_mm {spacing_zyx_mm!r}: expected three positive numbers")
    return spacing  # type: ignore[return-value]


def normalized_surface_dice(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing_zyx_mm: Spacing,
                            tolerance_mm: float) -> float:
    """DeepMind's surface Dice at `tolerance_mm`; 1.0 when both masks are empty, 0.0 when one is.

    Works on the union bounding box with a one-voxel background margin: the result is identical and
    the cost follows the organ's size, not the scan's."""
    pred, gt = np.asarray(pred_mask, bool), np.asarray(gt_mask, bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"masks of shapes {pred.shape} and {gt.shape}: expected two equal 3D shapes")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not (has_pred and has_gt):
        return 1.0 if has_pred == has_gt else 0.0
    box = _union_box(pred, gt)
    return _surface_dice(pred[box], gt[box], _spacing(spacing_zyx_mm), float(tolerance_mm))


# ---- FLARE rules ------------------------------------------------------------------------------------

def score_class(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing_zyx_mm: Spacing, tolerance_mm: float, *,
                gt_slices_only: bool = False) -> dict[str, float]:
    """{"dsc", "nsd"} of one class with FLARE's rules; `gt_slices_only` for aorta, IVC, esophagus."""
    pred, gt = np.asarray(pred_mask, bool), np.asarray(gt_mask, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    # The organisers test for empty masks on the whole volume, before the slice range is applied.
    if not gt.any():
        return {"dsc": 1.0, "nsd": 1.0} if not pred.any() else {"dsc": 0.0, "nsd": 0.0}
    if gt_slices_only:
        z = np.flatnonzero(gt.any(axis=(1, 2)))
        pred, gt = pred[z[0] : z[-1]], gt[z[0] : z[-1]]  # [zmin, zmax): the upper slice is left out
        if not gt.any():
            return {"dsc": float("nan"), "nsd": float("nan")}
    dsc = dice(pred, gt)
    if dsc < 0.2:
        return {"dsc": dsc, "nsd": 0.0}
    return {"dsc": dsc, "nsd": normalized_surface_dice(pred, gt, spacing_zyx_mm, tolerance_mm)}


def _label_boxes(labels: np.ndarray) -> list[tuple[slice, ...] | None]:
    """Bounding box of each organ label 1..13 (None where absent); other values are no organ."""
    if labels.dtype.kind not in "ui":
        raise ValueError(f"label map of dtype {labels.dtype}: expected integers")
    return ndimage.find_objects(labels if labels.dtype.kind == "u" else np.maximum(labels, 0), max_label=13)


def _box_union(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...]:
    boxes = [box for box in (a, b) if box is not None]
    return tuple(slice(min(s[k].start for s in boxes), max(s[k].stop for s in boxes)) for k in range(3))


def score_case(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing_zyx_mm: Spacing,
               task: str = "organs") -> dict[str, dict[str, float]]:
    """Per-class {"dsc", "nsd"}: the 13 organs by name (task "organs"), or "lesion" (task "lesion",
    binary: every nonzero value is lesion)."""
    pred, gt = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape}: expected two equal 3D shapes")
    if task == "lesion":
        return {"lesion": score_class(pred != 0, gt != 0, spacing_zyx_mm, LESION_TOLERANCE_MM)}
    if task != "organs":
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    # One pass per volume finds every label's box; each class is then scored on its own box only.
    pred_boxes, gt_boxes = _label_boxes(pred), _label_boxes(gt)
    scores = {}
    for label, name in enumerate(ORGAN_NAMES, start=1):
        pred_box, gt_box = pred_boxes[label - 1], gt_boxes[label - 1]
        if gt_box is None:
            scores[name] = {"dsc": 1.0, "nsd": 1.0} if pred_box is None else {"dsc": 0.0, "nsd": 0.0}
            continue
        box = _box_union(pred_box, gt_box)
        scores[name] = score_class(pred[box] == label, gt[box] == label, spacing_zyx_mm, ORGAN_TOLERANCE_MM[label],
                                   gt_slices_only=label in GT_SLAB_LABELS)
    return scores


def score_files(pred_path: str | Path, gt_path: str | Path, task: str = "organs") -> dict[str, dict[str, float]]:
    """Score a predicted label file against the ground truth; both must lie on one voxel grid."""
    from flarebox import io

    pred_volume, gt_volume = io.read_image(Path(pred_path)), io.read_image(Path(gt_path))
    pred_grid, gt_grid = pred_volume.geometry, gt_volume.geometry
    same = (pred_grid.size_xyz == gt_grid.size_xyz
            and np.allclose(pred_grid.spacing_xyz_mm, gt_grid.spacing_xyz_mm, rtol=0, atol=1e-4)
            and np.allclose(pred_grid.origin_xyz_mm, gt_grid.origin_xyz_mm, rtol=0, atol=1e-3)
            and np.allclose(pred_grid.direction, gt_grid.direction, rtol=0, atol=1e-4))
    if not same:
        raise ValueError(f"{pred_path} and {gt_path} lie on different voxel grids "
                         f"(size {pred_grid.size_xyz} vs {gt_grid.size_xyz}, spacing {pred_grid.spacing_xyz_mm} vs "
                         f"{gt_grid.spacing_xyz_mm}, origin {pred_grid.origin_xyz_mm} vs {gt_grid.origin_xyz_mm}, "
                         f"direction {pred_grid.direction} vs {gt_grid.direction}): the metrics do no resampling")
    return score_case(np.rint(pred_volume.array_zyx).astype(np.int32), np.rint(gt_volume.array_zyx).astype(np.int32),
                      gt_grid.spacing_zyx_mm, task)
