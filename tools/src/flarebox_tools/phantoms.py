"""Synthetic abdominal CT and MRI cases with the 13 FLARE organs and lesions, deterministic per seed.

No FLARE data reaches this project: demo weights are trained, and the engine is exercised, on these.
In: a seed and a few options. Out: a `Phantom` (image, organ labels, lesion labels and SimpleITK
geometry), or an nnU-Net raw dataset on disk.

Anatomy is drawn in patient coordinates (LPS, mm: x towards the patient's left, y towards the back,
z up; z = 0 at the top of the right diaphragm dome) as tissue ids on an axis-aligned grid: body wall
(skin, fat, muscle), spine, ribs, lung bases and heart above the diaphragm, bowel, vessels and the 13
organs at their usual places with per-patient size, position and shape variation, and lesions inside
organs and elsewhere. The tissue map is carried onto the case's own grid (spacing, field of view, RAS,
LPS or oblique direction) by nearest-neighbour resampling, so labels and image agree by construction,
and then rendered: Hounsfield units per tissue and contrast phase, texture, partial-volume blur and
correlated noise for CT; per-tissue T1-like or T2-like signal, a smooth bias field, Rician noise and an
arbitrary scale for MRI. A second anatomy, "template", elastically deforms a real label map
(../shared/data/real/ts_ct_sm.nii.gz, its CT giving fat, muscle, bone and air) instead.

    python -m flarebox_tools.phantoms --out DIR --n 20 --seed 0 [--modality ct|t1|t2] [--label-set organs|lesion]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from flarebox_tools.metrics import ORGAN_NAMES
from flarebox_tools.paths import REAL_LABELS

log = logging.getLogger("flarebox_tools.phantoms")

ORGAN_LABELS = {"background": 0, **{name: label for label, name in enumerate(ORGAN_NAMES, start=1)}}
LESION_LABELS = {"background": 0, "lesion": 1}
PHASES = ("non-contrast", "arterial", "portal-venous")
MODALITIES = ("ct", "t1", "t2")
ANATOMIES = ("synthetic", "template")
ORIENTATIONS = ("lps", "ras", "oblique")
TEMPLATE_LABELS = REAL_LABELS


# ---- tissues ----------------------------------------------------------------------------------------

class Tissue(NamedTuple):
    organ: int  # FLARE label it belongs to (0: none)
    hu: tuple[float, float, float]  # non-contrast, arterial, portal-venous
    t1: float  # relative MRI signal, T1-like
    t2: float  # relative MRI signal, T2-like
    texture: float  # standard deviation of its low-frequency texture, HU


# Tissue ids 1..13 are the organs' own; the rest are parts of organs or unlabelled tissue. Values are
# typical of adult abdominal CT (enhancement scales with a per-case contrast dose) and of relative
# T1/T2 weighted signal (fat bright in both, fluid bright in T2, flow voids dark).
(LIVER_VESSEL, R_MEDULLA, L_MEDULLA, STOMACH_LUMEN, STOMACH_GAS, DUODENUM_LUMEN, FAT, MUSCLE, BONE, MARROW, DISC,
 CSF, LUNG, LUNG_VESSEL, AIR, GAS, BOWEL_WALL, BOWEL_FLUID, STOOL, VEIN, ARTERY, BLOOD, MYOCARDIUM, CARTILAGE, RIB,
 TABLE_SHELL, TABLE_CORE, SOFT, DUODENUM_GAS) = range(14, 43)
TISSUES: dict[int, Tissue] = {
    1: Tissue(1, (58, 72, 112), 0.60, 0.22, 5),  # liver
    2: Tissue(2, (32, 185, 165), 0.50, 0.55, 5),  # right kidney (cortex)
    3: Tissue(3, (47, 120, 118), 0.42, 0.62, 7),  # spleen
    4: Tissue(4, (42, 118, 96), 0.68, 0.36, 10),  # pancreas
    5: Tissue(5, (42, 330, 165), 0.08, 0.05, 3),  # aorta
    6: Tissue(6, (40, 85, 140), 0.15, 0.20, 4),  # inferior vena cava
    7: Tissue(7, (28, 70, 62), 0.45, 0.40, 4),  # right adrenal gland
    8: Tissue(8, (28, 70, 62), 0.45, 0.40, 4),  # left adrenal gland
    9: Tissue(9, (8, 10, 12), 0.15, 0.98, 2),  # gallbladder
    10: Tissue(10, (42, 60, 78), 0.38, 0.30, 5),  # esophagus
    11: Tissue(11, (42, 95, 88), 0.40, 0.35, 5),  # stomach wall
    12: Tissue(12, (42, 95, 88), 0.40, 0.42, 5),  # duodenum wall
    13: Tissue(13, (32, 185, 165), 0.50, 0.55, 5),  # left kidney (cortex)
    LIVER_VESSEL: Tissue(1, (40, 110, 165), 0.35, 0.40, 3),  # slow flow: MRI contrast is mild
    R_MEDULLA: Tissue(2, (30, 80, 150), 0.35, 0.75, 5),
    L_MEDULLA: Tissue(13, (30, 80, 150), 0.35, 0.75, 5),
    STOMACH_LUMEN: Tissue(11, (14, 15, 16), 0.12, 0.95, 6),
    STOMACH_GAS: Tissue(11, (-960, -960, -960), 0.02, 0.02, 5),
    DUODENUM_LUMEN: Tissue(12, (18, 20, 22), 0.15, 0.90, 4),
    FAT: Tissue(0, (-105, -105, -100), 0.95, 0.80, 6),
    MUSCLE: Tissue(0, (48, 55, 62), 0.33, 0.18, 5),
    BONE: Tissue(0, (750, 750, 750), 0.04, 0.04, 60),
    MARROW: Tissue(0, (220, 230, 240), 0.70, 0.50, 30),
    DISC: Tissue(0, (85, 88, 92), 0.35, 0.70, 5),
    CSF: Tissue(0, (12, 12, 14), 0.10, 1.00, 2),
    LUNG: Tissue(0, (-860, -860, -860), 0.03, 0.03, 20),
    LUNG_VESSEL: Tissue(0, (40, 200, 150), 0.10, 0.10, 5),
    AIR: Tissue(0, (-1000, -1000, -1000), 0.0, 0.0, 0),
    GAS: Tissue(0, (-970, -970, -970), 0.02, 0.02, 5),
    BOWEL_WALL: Tissue(0, (42, 95, 90), 0.40, 0.45, 5),
    BOWEL_FLUID: Tissue(0, (18, 20, 24), 0.15, 0.90, 5),
    STOOL: Tissue(0, (-60, -60, -60), 0.35, 0.45, 90),
    VEIN: Tissue(0, (40, 120, 170), 0.12, 0.10, 4),
    ARTERY: Tissue(0, (42, 330, 165), 0.08, 0.05, 3),
    BLOOD: Tissue(0, (42, 280, 155), 0.15, 0.25, 4),
    MYOCARDIUM: Tissue(0, (45, 110, 100), 0.40, 0.25, 5),
    CARTILAGE: Tissue(0, (120, 120, 120), 0.30, 0.35, 25),
    RIB: Tissue(0, (480, 480, 480), 0.10, 0.10, 60),
    TABLE_SHELL: Tissue(0, (250, 250, 250), 0.0, 0.0, 5),
    TABLE_CORE: Tissue(0, (-850, -850, -850), 0.0, 0.0, 5),
    SOFT: Tissue(0, (45, 65, 80), 0.38, 0.40, 8),
    DUODENUM_GAS: Tissue(12, (-950, -950, -950), 0.02, 0.02, 5),  # swallowed air: the duodenum is often part gas
}
# Lesion kinds ride in the two high bits of a tissue id, so one uint8 map carries host and lesion.
LESION_SHIFT = 6
TISSUE_MASK = (1 << LESION_SHIFT) - 1
SOLID, CYST, HYPERVASCULAR = 1, 2, 3
LESION_KINDS: dict[int, Tissue] = {
    SOLID: Tissue(0, (38, 55, 68), 0.30, 0.62, 8),  # metastasis-like, hypodense
    CYST: Tissue(0, (8, 9, 10), 0.08, 1.00, 2),
    HYPERVASCULAR: Tissue(0, (42, 135, 85), 0.40, 0.70, 10),  # bright in the arterial phase, washes out
}


def organ_lookup() -> np.ndarray:
    """FLARE organ label of each of the 256 tissue codes."""
    lut = np.zeros(256, np.uint8)
    for kind in range(4):
        for tissue_id, tissue in TISSUES.items():
            lut[tissue_id | (kind << LESION_SHIFT)] = tissue.organ
    return lut


# ---- geometry ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """A voxel grid in patient space, in SimpleITK's terms: world = origin + direction @ (index * spacing)."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def matrix(self) -> np.ndarray:
        """Index (x, y, z) to world offset, mm."""
        return np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing_zyx_mm[::-1])

    def corners_xyz_mm(self) -> np.ndarray:
        extent = np.array(self.shape_zyx[::-1]) - 1
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * extent
        return np.asarray(self.origin_xyz_mm) + corners @ self.matrix.T

    def axes_xyz_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates along x, y, z of an axis-aligned (identity direction) grid."""
        return tuple(np.float32(o) + np.float32(s) * np.arange(n, dtype=np.float32)
                     for o, s, n in zip(self.origin_xyz_mm, self.spacing_zyx_mm[::-1], self.shape_zyx[::-1],
                                        strict=True))


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_grid(rng: np.random.Generator, *, centre_xyz_mm: Sequence[float], body_width_mm: float,
                orientation: str | None = None, spacing_zyx_mm: Sequence[float] | None = None,
                spacing_scale: float = 1.0, shape_zyx: Sequence[int] | None = None,
                z_length_mm: float | None = None) -> Grid:
    """A scanner's grid around `centre_xyz_mm`: 0.6-1 mm in-plane (a 512 matrix whose field of view
    fits the body, now and then cutting it), 1-5 mm slices over 160-320 mm (at most 200 slices);
    direction LPS, RAS, or oblique (up to 15 degrees in-plane and 6 out of plane)."""
    orientation = orientation or str(rng.choice(ORIENTATIONS, p=[0.4, 0.4, 0.2]))
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r}: expected one of {ORIENTATIONS}")
    fov_mm = float(np.clip(body_width_mm * rng.uniform(1.02, 1.35), 300, 512))
    # a quarter of scans cut the body at the sides (a reconstruction fitted to the abdomen, a cropped export)
    tight = rng.random() < 0.25
    if tight:
        fov_mm = float(np.clip(body_width_mm * rng.uniform(0.8, 1.0), 240, 512))
    if spacing_zyx_mm is None:
        spacing_xy = float(np.clip(fov_mm / 512, 0.6, 1.0))
        spacing_z = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                                     p=[0.1, 0.1, 0.1, 0.15, 0.2, 0.15, 0.05, 0.15]))
        spacing = np.array([spacing_z, spacing_xy, spacing_xy])
    else:
        spacing = np.asarray(spacing_zyx_mm, float)
    spacing = spacing * spacing_scale
    length_mm = z_length_mm or float(rng.uniform(160, 320))
    if shape_zyx is None:
        most = 600 if length_mm > 320 else 200  # thorax-to-thighs scans up to 600 slices
        n_slices = max(8, min(most, round(length_mm / spacing[0])))
        depth_mm = fov_mm * (rng.uniform(0.75, 1.0) if tight else 1.0)  # front to back
        shape = (n_slices, round(depth_mm / spacing[1]), round(fov_mm / spacing[2]))
    else:
        shape = tuple(int(n) for n in shape_zyx)
    direction = np.eye(3) if orientation == "lps" else np.diag([-1.0, -1.0, 1.0])
    if orientation == "oblique":
        base = np.eye(3) if rng.random() < 0.5 else np.diag([-1.0, -1.0, 1.0])
        tilt = rng.uniform(-6, 6, 2)
        direction = _rotation([tilt[0], tilt[1], rng.choice([-1, 1]) * rng.uniform(5, 15)]) @ base
    size_xyz = np.array(shape[::-1])
    origin = np.asarray(centre_xyz_mm) - direction @ ((size_xyz - 1) / 2 * spacing[::-1])
    return Grid(tuple(shape), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                tuple(float(d) for d in direction.ravel()))


def _covering_grid(grids: Sequence[Grid], max_spacing_z_mm: float = 2.5) -> Grid:
    """The axis-aligned grid that covers `grids`, at their in-plane spacing and at most 2.5 mm in z
    (oblique slices then cut through fine steps)."""
    corners = np.concatenate([g.corners_xyz_mm() for g in grids])
    sz, sy, sx = grids[0].spacing_zyx_mm
    spacing = np.array([sx, sy, min(sz, max_spacing_z_mm)])
    low, high = corners.min(0) - spacing, corners.max(0) + spacing
    size = np.ceil((high - low) / spacing).astype(int) + 1
    return Grid(tuple(int(n) for n in size[::-1]), tuple(float(s) for s in spacing[::-1]),
                tuple(float(v) for v in low))


def _to_sitk(array_zyx: np.ndarray, grid: Grid) -> sitk.Image:
    """The one place where (z, y, x) arrays meet SimpleITK's (x, y, z) geometry in this module."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing(tuple(float(s) for s in grid.spacing_zyx_mm[::-1]))
    image.SetOrigin(grid.origin_xyz_mm)
    image.SetDirection(grid.direction)
    return image


def _resample_labels(tissue: np.ndarray, source: Grid, target: Grid,
                     transform: sitk.Transform | None = None) -> np.ndarray:
    """Nearest-neighbour resampling of a tissue map onto another grid (outside: air)."""
    if source == target and transform is None:
        return tissue
    reference = sitk.Image([int(n) for n in target.shape_zyx[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in target.spacing_zyx_mm[::-1]))
    reference.SetOrigin(target.origin_xyz_mm)
    reference.SetDirection(target.direction)
    moved = sitk.Resample(_to_sitk(tissue, source), reference, transform or sitk.Transform(),
                          sitk.sitkNearestNeighbor, AIR, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(moved)


# ---- smooth random fields -----------------------------------------------------------------------------

def _interp_axis(values: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of `values` along one axis at fractional indices `coords` (clamped)."""
    n = values.shape[axis]
    c = np.clip(coords, 0, n - 1).astype(np.float32)
    low = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    weight = (c - low).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
    high = np.minimum(low + 1, n - 1)
    lo_values = np.take(values, low, axis=axis)
    return lo_values + (np.take(values, high, axis=axis) - lo_values) * weight


@dataclass(frozen=True)
class WorldField:
    """A smooth random field on a world lattice (mm), unit standard deviation; grid-independent."""

    values_zyx: np.ndarray
    low_xyz_mm: tuple[float, float, float]
    step_mm: float

    @classmethod
    def random(cls, rng: np.random.Generator, low_xyz_mm: Sequence[float], high_xyz_mm: Sequence[float],
               step_mm: float, feature_mm: float) -> WorldField:
        shape = tuple(int(np.ceil((h - lo) / step_mm)) + 1 for lo, h in zip(low_xyz_mm, high_xyz_mm, strict=True))
        noise = ndimage.gaussian_filter(rng.standard_normal(shape[::-1], dtype=np.float32), feature_mm / step_mm)
        return cls(noise / max(float(noise.std()), 1e-6), tuple(float(v) for v in low_xyz_mm), float(step_mm))

    def sample(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, stride: int = 1) -> np.ndarray:
        """Values at the outer product of 1D world coordinates (x, y, z): a (z, y, x) array. With
        `stride` > 1 the field is evaluated on every stride-th x and y and repeated (4x cheaper at 2)."""
        x, y, z = np.ravel(x), np.ravel(y), np.ravel(z)
        out_sizes = (len(z), len(y), len(x))
        coords = [(np.ravel(c)[::st] - low) / self.step_mm for c, low, st in
                  ((z, self.low_xyz_mm[2], 1), (y, self.low_xyz_mm[1], stride), (x, self.low_xyz_mm[0], stride))]
        # crop the lattice to what the coordinates need, then interpolate the shrinking axes first
        values = self.values_zyx
        crop = []
        for axis, c in enumerate(coords):
            n = values.shape[axis]
            low = int(np.clip(np.floor(c.min()), 0, max(n - 2, 0)))
            high = int(np.clip(np.ceil(c.max()) + 1, low + 2, n))
            crop.append(slice(low, high))
            coords[axis] = c - low
        out = values[tuple(crop)]
        for axis in sorted(range(3), key=lambda a: len(coords[a]) / out.shape[a]):
            out = _interp_axis(out, axis, coords[axis])
        if stride > 1:
            out = np.repeat(np.repeat(out, stride, axis=1)[:, : out_sizes[1]], stride, axis=2)[:, :, : out_sizes[2]]
        return out


# ---- the synthetic patient -----------------------------------------------------------------------------

class Lesion(NamedTuple):
    centre_xyz_mm: np.ndarray
    radii_mm: np.ndarray
    rotation: np.ndarray
    kind: int
    host: tuple[int, ...]  # tissue ids it may replace


@dataclass(frozen=True)
class Patient:
    """Everything random about one synthetic patient (world mm, LPS); painting it is deterministic."""

    half_width_mm: float  # skin, left-right
    half_depth_front_mm: float  # skin, centre to front
    half_depth_back_mm: float  # skin, centre to back
    fat_mm: float  # subcutaneous fat
    scale_xyz: np.ndarray  # reference cavity frame to this patient
    shifts: dict[str, np.ndarray]  # per structure, mm
    sizes: dict[str, float]  # per structure, relative
    lesions: tuple[Lesion, ...]
    bowel: WorldField
    bowel_gas: WorldField
    vessels: tuple[WorldField, WorldField]
    oral_contrast: bool
    bifurcation_z_mm: float

    def at(self, name: str, x: float, y: float, z: float) -> np.ndarray:
        """A point of structure `name` given in the reference frame (cavity 123 x 83 mm, z = 0 at the
        right dome), placed in this patient."""
        return np.array([x, y, z]) * self.scale_xyz + self.shifts.get(name, 0.0)

    def radii(self, name: str, rx: float, ry: float, rz: float) -> np.ndarray:
        return np.array([rx, ry, rz]) * self.scale_xyz * self.sizes.get(name, 1.0)


STRUCTURES = ("liver", "spleen", "stomach", "pancreas", "duodenum", "gallbladder", "right_kidney", "left_kidney",
              "right_adrenal", "left_adrenal", "aorta", "ivc", "esophagus", "heart", "colon", "spine", "portal")
LESION_HOSTS = {  # name: (relative frequency, tissue ids it may replace, kinds and their odds)
    "liver": (5, (1, LIVER_VESSEL), (0.5, 0.25, 0.25)),
    "right_kidney": (1, (2, R_MEDULLA), (0.4, 0.6, 0.0)),
    "left_kidney": (1, (13, L_MEDULLA), (0.4, 0.6, 0.0)),
    "spleen": (1, (3,), (0.6, 0.4, 0.0)),
    "pancreas": (2, (4,), (0.8, 0.2, 0.0)),
    "node": (2, (FAT, SOFT), (1.0, 0.0, 0.0)),  # a lymph node by the aorta: lesion, no organ
}
LESION_SITES = {  # reference centre and spread, mm
    "liver": ((-70, -5, -70), (40, 45, 40)), "right_kidney": ((-74, 38, -165), (10, 8, 30)),
    "left_kidney": ((74, 38, -150), (10, 8, 30)), "spleen": ((88, 40, -72), (10, 15, 25)),
    "pancreas": ((10, -30, -130), (35, 6, 8)), "node": ((0, 0, -160), (35, 5, 40)),
}


def draw_patient(rng: np.random.Generator, *, n_lesions: int | None = None, min_lesions: int = 0) -> Patient:
    """A random adult: body size and fat, organ positions and sizes, lesions (n_lesions, else a
    random count of at least min_lesions), bowel and vessel fields."""
    # organs follow the frame (the cavity inside the muscle wall); fat only adds around it
    cavity_x = float(rng.uniform(110, 135))
    cavity_y = float(cavity_x * rng.uniform(0.62, 0.74))
    fat = float(rng.uniform(8, 40))
    half_width = cavity_x + fat * 1.1 + 9
    half_depth = cavity_y + fat + 10
    scale = np.array([cavity_x / 123, cavity_y / 83, rng.uniform(0.9, 1.1)])
    shifts = {name: rng.normal(0, [5, 4, 7]) for name in STRUCTURES}
    shifts["spine"] = rng.normal(0, [1, 2, 6])
    sizes = {name: float(rng.uniform(0.85, 1.15)) for name in STRUCTURES}
    for right, left in (("right_kidney", "left_kidney"), ("right_adrenal", "left_adrenal")):  # pairs match
        sizes[left] = sizes[right] * float(rng.uniform(0.93, 1.07))
    names = list(LESION_HOSTS)
    odds = np.array([LESION_HOSTS[n][0] for n in names], float)
    counts = [c for c in (0, 1, 1, 2, 2, 3, 4, 5) if c >= min_lesions] or [min_lesions]
    count = int(rng.choice(counts)) if n_lesions is None else n_lesions
    lesions = []
    for _ in range(count):
        host = names[int(rng.choice(len(names), p=odds / odds.sum()))]
        centre, spread = (np.array(v, float) for v in LESION_SITES[host])
        point = (centre + rng.uniform(-1, 1, 3) * spread) * scale + shifts.get(host, 0.0)
        if host == "node":
            point[0] = rng.choice([-1, 1]) * rng.uniform(20, 40) * scale[0]
        small = host in ("node", "pancreas")
        radius = float(rng.uniform(4, 9) if small else np.exp(rng.uniform(np.log(4), np.log(25))))
        kind = int(rng.choice([SOLID, CYST, HYPERVASCULAR], p=LESION_HOSTS[host][2]))
        lesions.append(Lesion(point, radius * rng.uniform(0.8, 1.2, 3), _rotation(rng.uniform(-90, 90, 3)), kind,
                              LESION_HOSTS[host][1]))
    return Patient(
        half_width_mm=half_width, half_depth_front_mm=half_depth, half_depth_back_mm=half_depth * 0.95, fat_mm=fat,
        scale_xyz=scale, shifts=shifts, sizes=sizes, lesions=tuple(lesions),
        bowel=WorldField.random(rng, (-220, -200, -480), (220, 120, -40), 3.0, 5.0),
        bowel_gas=WorldField.random(rng, (-220, -200, -480), (220, 120, -40), 6.0, 10.0),
        vessels=(WorldField.random(rng, (-200, -160, -260), (200, 160, 200), 3.0, 5.0),
                 WorldField.random(rng, (-200, -160, -260), (200, 160, 200), 3.0, 5.0)),
        oral_contrast=bool(rng.random() < 0.25), bifurcation_z_mm=float(rng.uniform(-290, -240) * scale[2]))


# ---- painting ----------------------------------------------------------------------------------------------

class Block(NamedTuple):
    slices: tuple[slice, slice, slice]
    x: np.ndarray  # (1, 1, nx) world mm
    y: np.ndarray  # (1, ny, 1)
    z: np.ndarray  # (nz, 1, 1)


class Canvas:
    """A tissue map being painted on an axis-aligned grid; shapes are evaluated on their bounding box only."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.x, self.y, self.z = grid.axes_xyz_mm()
        self.tissue = np.full(grid.shape_zyx, AIR, np.uint8)
        # regions set by the body painter and used to clip what comes after
        self.fat_inner = self.cavity = self.abdomen = np.zeros(grid.shape_zyx, bool)

    def block(self, low_xyz_mm: Sequence[float], high_xyz_mm: Sequence[float]) -> Block | None:
        ranges = [np.searchsorted(axis, [lo, hi]) for axis, lo, hi in
                  zip((self.x, self.y, self.z), low_xyz_mm, high_xyz_mm, strict=True)]
        if any(a >= b for a, b in ranges):
            return None
        sx, sy, sz = (slice(int(a), int(b)) for a, b in ranges)
        return Block((sz, sy, sx), self.x[sx][None, None, :], self.y[sy][None, :, None], self.z[sz][:, None, None])

    def field(self, field: WorldField, block: Block) -> np.ndarray:
        """`field` on `block`; large blocks of fine grids at every other x and y (masks of smooth fields
        then step by two voxels, which the scanner blur hides)."""
        size = block.x.size * block.y.size * block.z.size
        stride = 2 if size > 3_000_000 and self.grid.spacing_zyx_mm[2] < 1.1 else 1
        return field.sample(block.x, block.y, block.z, stride)

    def paint(self, block: Block, mask: np.ndarray, value: int, *, where: np.ndarray | None = None) -> None:
        target = self.tissue[block.slices]
        if where is not None:
            mask = mask & where[block.slices]
        target[mask] = value

    def ellipsoid(self, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray | None = None,
                  pad: float = 1.0) -> tuple[Block, np.ndarray] | None:
        """(block, normalised radius squared) of an ellipsoid, possibly rotated (columns: its axes)."""
        reach = float(np.max(radii)) * pad
        block = self.block(centre - reach, centre + reach)
        if block is None:
            return None
        d = (block.x - np.float32(centre[0]), block.y - np.float32(centre[1]), block.z - np.float32(centre[2]))
        if rotation is None:
            return block, sum((di / np.float32(r)) ** 2 for di, r in zip(d, radii, strict=True))
        rho2 = 0
        for axis in range(3):
            r = rotation[:, axis].astype(np.float32)
            rho2 = rho2 + ((r[0] * d[0] + r[1] * d[1] + r[2] * d[2]) / np.float32(radii[axis])) ** 2
        return block, rho2

    def tube(self, points: Sequence[Sequence[float]], radii: Sequence[float],
             flatten_xyz: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[Block, np.ndarray] | None:
        """(block, normalised distance squared) of a tube swept along a polyline with varying radius."""
        points, radii = np.asarray(points, float), np.asarray(radii, float)
        lengths = np.r_[0, np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]
        samples = np.arange(0, lengths[-1] + 1e-6, 0.3 * radii.min()) if lengths[-1] > 0 else np.zeros(1)
        centres = np.stack([np.interp(samples, lengths, points[:, a]) for a in range(3)], axis=1)
        r = np.interp(samples, lengths, radii)
        flatten = np.asarray(flatten_xyz)
        reach = (r[:, None] * flatten).max(0)
        block = self.block(centres.min(0) - reach, centres.max(0) + reach)
        if block is None:
            return None
        rho2 = np.full(tuple(s.stop - s.start for s in block.slices), np.inf, np.float32)
        for c, radius in zip(centres, r, strict=True):
            ball = self.block(c - radius * flatten, c + radius * flatten)
            if ball is None:
                continue
            local = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(ball.slices, block.slices,
                                                                                    strict=True))
            value = (((ball.x - np.float32(c[0])) / np.float32(radius * flatten[0])) ** 2
                     + ((ball.y - np.float32(c[1])) / np.float32(radius * flatten[1])) ** 2
                     + ((ball.z - np.float32(c[2])) / np.float32(radius * flatten[2])) ** 2)
            np.minimum(rho2[local], value, out=rho2[local])
        return block, rho2


def _superellipse(x: np.ndarray, y: np.ndarray, half_width: np.ndarray, front: np.ndarray,
                  back: np.ndarray) -> np.ndarray:
    """<= 1 inside a torso section: an ellipse in front, a flatter curve behind (the back on the table)."""
    u = np.abs(x / half_width) ** 2
    v = np.where(y < 0, np.abs(y / front) ** 2, np.abs(y / back) ** 2.8)
    return u + v


def _cavity_axes(p: Patient, width: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """Half-axes (width, front, back) of the abdominal cavity inside fat and the muscle wall."""
    return (width - np.float32(p.fat_mm * 1.1 + 9), np.float32(p.half_depth_front_mm - p.fat_mm - 10),
            np.float32(p.half_depth_back_mm - p.fat_mm * 0.6 - 12))


def diaphragm_z_mm(patient: Patient, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the diaphragm over (y, x): two domes (the right one higher), lower at the back and sides."""
    s = patient.scale_xyz
    right = -0.011 * ((x / s[0] + 60) ** 2) - 0.005 * (y / s[1] - 5) ** 2
    left = -12 - 0.011 * ((x / s[0] - 62) ** 2) - 0.005 * (y / s[1] - 5) ** 2
    tendon = -18 - 0.004 * (x / s[0] - 5) ** 2 - 0.005 * (y / s[1] + 10) ** 2  # the heart rests on it
    back = -0.65 * np.maximum(y / s[1] - 10, 0)
    return (np.maximum(np.maximum(right, left), tendon) + back) * s[2]


def _spine_centre(patient: Patient, z: np.ndarray) -> np.ndarray:
    """Vertebral body centre (y, mm) along z: slight lordosis, lower vertebrae further forward."""
    s = patient.scale_xyz
    return (32 + 0.05 * np.minimum(z / s[2] + 100, 0)) * s[1] + patient.shifts["spine"][1]


def paint_synthetic(patient: Patient, grid: Grid) -> np.ndarray:
    """The patient's tissue map (uint8 tissue ids, lesion kinds in the high bits) on an axis-aligned grid."""
    canvas = Canvas(grid)
    _paint_body(canvas, patient)
    _paint_organs(canvas, patient)
    _paint_skeleton(canvas, patient)
    _paint_great_vessels(canvas, patient)
    _paint_legs(canvas, patient)
    _paint_lesions(canvas, patient.lesions)
    return canvas.tissue


def hip_z_mm(p: Patient) -> float:
    """Where the trunk parts into the thighs: 22 cm under the aortic bifurcation (scaled)."""
    return float(p.bifurcation_z_mm - 220 * p.scale_xyz[2])


def _paint_legs(canvas: Canvas, p: Patient) -> None:
    """Below the hips, two thighs (skin, fat, muscle around a femur), narrowing towards the knees.
    Only long fields of view reach them ("thorax to thighs"); abdominal ones end above the hips."""
    hip = hip_z_mm(p)
    block = canvas.block((-1e4, -1e4, -1e4), (1e4, 1e4, hip))
    if block is None:
        return
    half = np.float32(p.half_width_mm)
    depth = np.float32(min(p.half_depth_front_mm, p.half_depth_back_mm))
    x, y = block.x[0], block.y[0]  # (1, nx), (ny, 1)
    tissue = canvas.tissue[block.slices]
    for k, z in enumerate(block.z[:, 0, 0]):
        plane = tissue[k]
        plane[(plane != TABLE_SHELL) & (plane != TABLE_CORE)] = AIR
        taper = np.float32(1 - 0.3 * min((hip - z) / 450, 1))  # thigh to knee
        for side in (-1, 1):
            cx = side * 0.48 * half
            rx, ry = 0.46 * half * taper, 0.85 * depth * taper
            rho2 = ((x - cx) / rx) ** 2 + (y / ry) ** 2
            fat = np.float32(p.fat_mm * 0.7 * taper)
            inner = ((x - cx) / (rx - fat)) ** 2 + (y / (ry - fat)) ** 2
            bone = (x - cx - side * 6) ** 2 + (y + 5) ** 2
            plane[rho2 <= 1] = FAT
            plane[inner <= 1] = MUSCLE
            plane[bone <= 14.0**2] = BONE
            plane[bone <= 9.0**2] = MARROW


def _paint_body(canvas: Canvas, p: Patient) -> None:
    x, y, z = canvas.x[None, None, :], canvas.y[None, :, None], canvas.z[:, None, None]
    s = p.scale_xyz
    flare = 1 + 0.0004 * np.clip(-z - 150, 0, 200) - 0.0002 * np.clip(z, 0, 100)  # wider at the hips
    width = np.float32(p.half_width_mm) * flare
    front, back = np.float32(p.half_depth_front_mm), np.float32(p.half_depth_back_mm)
    body = _superellipse(x, y, width, front, back) <= 1
    fat_inner = _superellipse(x, y, width - p.fat_mm * 1.1, front - p.fat_mm, back - p.fat_mm * 0.6) <= 1
    cavity = _superellipse(x, y, *_cavity_axes(p, width)) <= 1
    t = canvas.tissue
    # the couch under the patient: a slightly curved carbon-fibre shell with a foam core
    table_y = back + 3 - 0.00022 * canvas.x[None, :] ** 2
    core = (canvas.y[:, None] > table_y + 1.5) & (canvas.y[:, None] < table_y + 10) & (np.abs(canvas.x) < 230)
    shell = (canvas.y[:, None] >= table_y) & (canvas.y[:, None] <= table_y + 11.5) & (np.abs(canvas.x) < 232)
    shell &= ~core
    t[:, shell] = TABLE_SHELL
    t[:, core] = TABLE_CORE
    t[body] = FAT
    t[fat_inner] = MUSCLE
    t[cavity] = FAT
    dome = diaphragm_z_mm(p, canvas.x[None, :], canvas.y[:, None]).astype(np.float32)[None]
    thorax = cavity & (z > dome)
    heart_centre = p.at("heart", 24, -28, 24)
    mediastinum = ((np.abs(x - np.float32(heart_centre[0] * 0.3)) < 26 * s[0]) & (y > -25 * s[1])) | (
        (((x - heart_centre[0]) / (80 * s[0])) ** 2 + ((y - heart_centre[1]) / (62 * s[1])) ** 2) < 1)
    lung = thorax & ~mediastinum
    t[lung] = LUNG
    t[cavity & (z <= dome) & (z > dome - 5)] = MUSCLE  # the diaphragm
    canvas.abdomen = cavity & (z <= dome - 5)  # where abdominal organs may lie
    canvas.cavity = cavity
    canvas.fat_inner = fat_inner
    # lung vessels: thin branching tubes where two smooth fields are both near zero
    box = ndimage.find_objects(lung.astype(np.uint8))
    if box:
        sz, sy, sx = box[0]
        block = Block(box[0], canvas.x[sx][None, None, :], canvas.y[sy][None, :, None], canvas.z[sz][:, None, None])
        v1, v2 = (canvas.field(f, block) for f in p.vessels)
        canvas.paint(block, (np.abs(v1) < 0.09) & (np.abs(v2) < 0.35), LUNG_VESSEL, where=lung)
    # the heart, resting on the diaphragm's central tendon
    rotation = _rotation([0, 0, -35])
    shape = canvas.ellipsoid(heart_centre, p.radii("heart", 54, 40, 50), rotation)
    if shape is not None:
        block, rho2 = shape
        canvas.paint(block, rho2 <= 1, MYOCARDIUM, where=thorax)
        canvas.paint(block, rho2 <= 0.6, BLOOD, where=thorax)
    _paint_bowel(canvas, p)


def _paint_bowel(canvas: Canvas, p: Patient) -> None:
    """Small-bowel loops (walls around fluid, some gas) below the mesocolon, and the colon's frame."""
    s = p.scale_xyz
    block = canvas.block((-130 * s[0], -100 * s[1], -420 * s[2]), (130 * s[0], 45 * s[1], -135 * s[2]))
    if block is not None:
        field = canvas.field(p.bowel, block)
        gas = canvas.field(p.bowel_gas, block) > 1.3
        region = canvas.abdomen[block.slices] & (block.y < 45 * s[1] - 0.3 * np.abs(block.x))
        canvas.paint(block, region & (field > 0.2), BOWEL_WALL)
        canvas.paint(block, region & (field > 0.55), BOWEL_FLUID)
        canvas.paint(block, region & (field > 0.55) & gas, GAS)
    z_bottom = -330
    points = [(-100, 15, z_bottom), (-102, 10, -200), (-88, -15, -150), (-55, -62, -150), (0, -68, -175),
              (55, -62, -150), (88, -8, -105), (104, 20, -150), (104, 22, z_bottom)]
    points = [p.at("colon", *q) for q in points]
    shape = canvas.tube(points, [26, 26, 24, 22, 22, 22, 22, 22, 22])
    if shape is not None:
        block, rho2 = shape
        where = canvas.abdomen
        canvas.paint(block, rho2 <= 1, BOWEL_WALL, where=where)
        lumen = rho2 <= 0.8
        mottled = canvas.field(p.bowel_gas, block) > 0.2
        canvas.paint(block, lumen & mottled, GAS, where=where)
        canvas.paint(block, lumen & ~mottled, STOOL, where=where)


def _paint_organs(canvas: Canvas, p: Patient) -> None:
    where = canvas.abdomen
    # stomach: a J from the fundus under the left dome down and across to the pylorus
    stomach = [p.at("stomach", *q) for q in ((52, 28, -38), (66, -18, -72), (52, -50, -108), (18, -62, -125),
                                             (-14, -52, -122))]
    shape = canvas.tube(stomach, [33, 35, 28, 20, 12])
    if shape:
        block, rho2 = shape
        canvas.paint(block, rho2 <= 1, 11, where=where)
        lumen = rho2 <= 0.72
        canvas.paint(block, lumen, STOMACH_LUMEN, where=where)
        # supine: gas rises to the front of the lumen
        front = np.argmax(lumen.any(axis=(0, 2))) if lumen.any() else 0
        gas_level = block.y.ravel()[min(front, block.y.size - 1)] + 12
        canvas.paint(block, lumen & (block.y < gas_level), STOMACH_GAS, where=where)
    # spleen: a curved ellipsoid along the left posterolateral ribs, its hilum facing forward-inward
    shape = canvas.ellipsoid(p.at("spleen", 88, 40, -72), p.radii("spleen", 28, 52, 55), _rotation([0, 0, 35]))
    if shape:
        block, rho2 = shape
        hilum = canvas.ellipsoid(p.at("spleen", 56, 16, -76), p.radii("spleen", 24, 28, 40))
        cut = _same_block(block, hilum)
        canvas.paint(block, (rho2 <= 1) & ~(cut <= 1), 3, where=where)
    # liver: a bulky right lobe and a tapering left lobe across the midline in front
    right = canvas.ellipsoid(p.at("liver", -70, -2, -62), p.radii("liver", 92, 92, 95))
    left = canvas.ellipsoid(p.at("liver", -2, -46, -45), p.radii("liver", 66, 38, 45), _rotation([0, 0, -15]))
    medial = canvas.ellipsoid(p.at("liver", -32, -52, -58), p.radii("liver", 48, 40, 45))  # bridges the lobes
    # the inferior (visceral) surface: lowest at the right lobe's tip, rising to the left, front and back
    tip = p.at("liver", -130, -10, -170)
    s = p.scale_xyz
    for shape in (right, left, medial):
        if shape:
            block, rho2 = shape
            u, v = (block.x - tip[0]) / s[0], (block.y - tip[1]) / s[1]
            floor = tip[2] + (0.45 * u + 0.007 * v**2) * s[2]
            canvas.paint(block, (rho2 <= 1) & (block.z > floor), 1, where=where)
    if right:
        block = canvas.block(p.at("liver", -170, -110, -170), p.at("liver", 80, 100, 30))
        if block:
            v1, v2 = (canvas.field(f, block) for f in p.vessels)
            canvas.paint(block, (np.abs(v1) < 0.1) & (np.abs(v2) < 0.45) & (canvas.tissue[block.slices] == 1),
                         LIVER_VESSEL)
    # hepatic veins into the IVC just below the dome, portal vein from the hilum
    ivc_top = p.at("ivc", -28, -8, -20)
    for end, r in (((-100, 5, -35), 5.5), ((-45, -55, -45), 5.0), ((5, -62, -40), 4.5)):
        _paint_tube(canvas, [ivc_top, p.at("liver", *end)], [r, r * 0.6], LIVER_VESSEL, inside=(1,))
    confluence = p.at("portal", -8, -22, -140)
    hilum = p.at("portal", -38, -15, -98)
    _paint_tube(canvas, [confluence, hilum, p.at("portal", -75, -5, -80)], [8, 7.5, 5], LIVER_VESSEL, inside=(1,))
    # kidneys: tilted, hilum forward-inward; cortex, medulla, sinus fat
    for name, label, medulla, side, centre in (("right_kidney", 2, R_MEDULLA, -1, (-74, 38, -165)),
                                                ("left_kidney", 13, L_MEDULLA, 1, (74, 38, -150))):
        rotation = _rotation([8, side * 12, side * -30])
        shape = canvas.ellipsoid(p.at(name, *centre), p.radii(name, 26, 23, 54), rotation)
        if not shape:
            continue
        block, rho2 = shape
        sinus = _same_block(block, canvas.ellipsoid(p.at(name, centre[0] - side * 20, centre[1] - 10, centre[2]),
                                                    p.radii(name, 14, 11, 24), rotation))
        field = canvas.field(p.vessels[0], block)
        canvas.paint(block, (rho2 <= 1) & ~(sinus <= 1), label, where=where)
        canvas.paint(block, (rho2 <= 0.55) & (rho2 > 0.12) & (field > -0.4) & ~(sinus <= 1.3), medulla, where=where)
        canvas.paint(block, (sinus <= 1) & (canvas.tissue[block.slices] == label), FAT)
    # adrenals: thin inverted-Y plates above and in front of the upper poles
    for name, label, centre, side in (("right_adrenal", 7, (-36, 20, -105), -1),
                                      ("left_adrenal", 8, (38, 16, -115), 1)):
        c = p.at(name, *centre)
        for angles, radii in (((0, 0, side * 25), (3.2, 15, 20)), ((0, side * 35, side * -30), (3.2, 12, 15))):
            shape = canvas.ellipsoid(c, p.radii(name, *radii), _rotation(angles))
            if shape:
                canvas.paint(shape[0], shape[1] <= 1, label, where=where)
    # duodenum: a C around the pancreatic head, crossing between aorta and SMA
    duodenum = [p.at("duodenum", *q) for q in ((-14, -52, -122), (-40, -30, -120), (-56, -8, -135), (-56, -6, -188),
                                               (-22, -18, -205), (15, -26, -205), (34, -22, -186), (40, -28, -168))]
    shape = canvas.tube(duodenum, [12, 12, 13, 13, 11, 10, 11, 12])
    if shape:
        block, rho2 = shape
        canvas.paint(block, rho2 <= 1, 12, where=where)
        canvas.paint(block, rho2 <= 0.45, DUODENUM_LUMEN, where=where)
        canvas.paint(block, (rho2 <= 0.45) & (canvas.field(p.bowel_gas, block) > 0.6), DUODENUM_GAS, where=where)
    # pancreas: head in the C, neck in front of the portal confluence, body over the aorta, tail to the spleen
    pancreas = [p.at("pancreas", *q) for q in ((-26, -8, -178), (-38, -22, -160), (-12, -42, -140), (25, -36, -126),
                                               (60, -8, -114), (82, 18, -102))]
    shape = canvas.tube(pancreas, [11, 17, 12, 12, 10, 8], flatten_xyz=(1, 0.65, 1))
    if shape:
        block, rho2 = shape
        lobules = canvas.field(p.vessels[1], block)
        canvas.paint(block, (rho2 <= 1) & ((rho2 <= 0.6) | (lobules > -1.2)), 4, where=where)
    # gallbladder under the liver, fundus forward and down
    shape = canvas.ellipsoid(p.at("gallbladder", -50, -52, -112), p.radii("gallbladder", 16, 18, 36),
                             _rotation([35, 0, 10]))
    if shape:
        canvas.paint(shape[0], shape[1] <= 1, 9, where=where)
    # veins and arteries that carry no label: portal, splenic, SMV, renal veins, celiac, SMA, renal arteries
    spleen_hilum = p.at("spleen", 78, 22, -80)
    vessels = [
        ([confluence, hilum], [8, 7.5], VEIN),
        ([confluence, p.at("portal", 25, -24, -124), p.at("portal", 62, 2, -110), spleen_hilum], [5.5, 5, 5, 4.5],
         VEIN),  # splenic vein
        ([confluence, p.at("portal", -12, -30, -200), p.at("portal", -14, -34, -260)], [6.5, 6, 5], VEIN),
        ([p.at("left_kidney", 45, 28, -146), p.at("aorta", 14, -14, -138), p.at("ivc", -24, 0, -138)], [5, 4.5, 5],
         VEIN),  # left renal vein, between aorta and SMA
        ([p.at("right_kidney", -46, 28, -160), p.at("ivc", -24, 2, -150)], [5.5, 5.5], VEIN),
        ([p.at("aorta", 14, 0, -104), p.at("aorta", 12, -22, -100), p.at("aorta", 30, -20, -100)], [4, 4, 3], ARTERY),
        ([p.at("aorta", 14, -8, -124), p.at("aorta", 10, -24, -150), p.at("aorta", 8, -30, -260)], [4.5, 4.5, 3.5],
         ARTERY),
        ([p.at("aorta", 16, 4, -142), p.at("left_kidney", 46, 30, -150)], [3, 3], ARTERY),
        ([p.at("aorta", 12, 6, -144), p.at("ivc", -24, 12, -148), p.at("right_kidney", -46, 30, -162)], [3, 3, 3],
         ARTERY),
    ]
    for points, radii, tissue in vessels:
        _paint_tube(canvas, points, radii, tissue, where=where, replace_into={1: LIVER_VESSEL})


def _same_block(block: Block, other: tuple[Block, np.ndarray] | None) -> np.ndarray:
    """`other`'s field on `block` (inf where it has no values): combines two shapes."""
    out = np.full(tuple(s.stop - s.start for s in block.slices), np.inf, np.float32)
    if other is None:
        return out
    b, values = other
    inner = tuple(slice(max(s.start, o.start), min(s.stop, o.stop))
                  for s, o in zip(block.slices, b.slices, strict=True))
    if any(s.start >= s.stop for s in inner):
        return out
    out[tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inner, block.slices, strict=True))] = \
        values[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, b.slices, strict=True))]
    return out


def _paint_tube(canvas: Canvas, points, radii, tissue: int, *, where: np.ndarray | None = None,
                inside: tuple[int, ...] | None = None, replace_into: dict[int, int] | None = None) -> None:
    shape = canvas.tube(points, radii)
    if not shape:
        return
    block, rho2 = shape
    current = canvas.tissue[block.slices]
    mask = rho2 <= 1
    if where is not None:
        mask &= where[block.slices]
    if inside is not None:
        mask &= np.isin(current, inside)
    if replace_into:
        for old, new in replace_into.items():
            current[mask & (current == old)] = new
            mask &= current != new
    current[mask] = tissue


def _paint_skeleton(canvas: Canvas, p: Patient) -> None:
    """Spine with discs and posterior elements, paraspinal and psoas muscles, ribs, cartilage, sternum."""
    s = p.scale_xyz
    z = canvas.z
    t = canvas.tissue
    vb_y = _spine_centre(p, z).astype(np.float32)[:, None, None]
    lumbar = np.clip((-z[:, None, None] / s[2] - 60) / 150, 0, 1)  # vertebrae grow downwards
    rx, ry = (21 + 4 * lumbar) * s[0], (16 + 3 * lumbar) * s[1]
    x0 = np.float32(p.shifts["spine"][0])
    block = canvas.block((-90 * s[0] + x0, -60, z.min()), (90 * s[0] + x0, p.half_depth_back_mm, z.max() + 1))
    if block is None:
        return
    sl = block.slices
    xb, yb = canvas.x[sl[2]][None, None, :] - x0, canvas.y[sl[1]][None, :, None]
    vb, lum, rxb, ryb = vb_y[sl[0]], lumbar[sl[0]], rx[sl[0]], ry[sl[0]]
    zb = z[sl[0]][:, None, None]
    period = 34 * s[2]
    phase = np.mod(zb - p.shifts["spine"][2], period)
    canal_y = vb + ryb + 11 * s[1]
    paraspinal = (((np.abs(xb) - 34 * s[0]) / (28 * s[0])) ** 2 + ((yb - canal_y - 16 * s[1]) / (26 * s[1])) ** 2) <= 1
    psoas_r = np.minimum(5 + np.maximum(-zb / s[2] - 110, 0) * 0.16, 24) * s[0] * (zb / s[2] < -105)
    psoas = ((np.abs(xb) - (24 + 0.6 * psoas_r / s[0]) * s[0]) ** 2 + (yb - vb + 2) ** 2) <= psoas_r**2
    region = t[sl]
    inner = canvas.fat_inner[sl]
    region[(paraspinal | psoas) & inner] = MUSCLE
    rho2 = (xb / rxb) ** 2 + ((yb - vb) / ryb) ** 2
    disc = phase < 8 * s[2]
    region[(rho2 <= 1) & ~disc] = BONE
    region[(rho2 <= 0.78) & ~disc] = MARROW
    region[(rho2 <= 1) & disc] = DISC
    canal = xb**2 + (yb - canal_y) ** 2
    arch = (canal <= (14 * s[0]) ** 2) & (yb > vb + ryb * 0.8)
    spinous = (np.abs(xb) < 4 * s[0]) & (yb > canal_y) & (yb < canal_y + 36 * s[1]) & (phase > 10 * s[2]) & (
        phase < 26 * s[2])
    transverse = (np.abs(yb - canal_y + 2 * s[1] - 0.15 * np.abs(xb)) < 3.5 * s[1]) & (
        np.abs(xb) < (22 + 18 * lum) * s[0]) & (phase > 13 * s[2]) & (phase < 20 * s[2])
    region[(arch | spinous | transverse) & inner] = BONE
    region[canal <= (9.5 * s[0]) ** 2] = CSF
    # ribs: rings around the body descending towards the front, above the costal margin; each an
    # 8 x 10 mm oval in the middle of the wall, cortex around marrow
    band = canvas.fat_inner & ~canvas.cavity
    k, j, i = np.nonzero(band)
    if k.size:
        xs, ys, zs = canvas.x[i], canvas.y[j], canvas.z[k]
        flare = 1 + 0.0004 * np.clip(-zs - 150, 0, 200) - 0.0002 * np.clip(zs, 0, 100)
        q = _superellipse(xs, ys, *_cavity_axes(p, np.float32(p.half_width_mm) * flare))
        depth = (np.sqrt(q) - 1) * np.hypot(xs, ys) - 5  # mm from the middle of the wall
        back = 0.5 * (1 + np.sin(np.arctan2(ys / p.half_depth_back_mm, xs / p.half_width_mm)))  # 1 at the back
        margin = (-175 + 150 * (1 - back) ** 1.5) * s[2]  # costal margin: low at the back, high in front
        period = 30 * s[2]
        offset = np.mod(zs + 110 * s[2] * (1 - back) - p.shifts["spine"][2], period) - period / 2
        rho2 = (depth / 4) ** 2 + (offset / 5) ** 2
        spine_or_sternum = ((np.abs(xs - x0) < 32 * s[0]) & (ys > 0)) | ((np.abs(xs) < 18) & (ys < 0))
        rib = (rho2 <= 1) & (zs > margin) & ~spine_or_sternum
        cartilage = back < 0.18
        t[k[rib], j[rib], i[rib]] = np.where(cartilage[rib], CARTILAGE, np.where(rho2[rib] < 0.4, MARROW, BONE))
    # sternum and xiphoid at the top, in front
    block = canvas.block((-16, -p.half_depth_front_mm, -45 * s[2]), (16, 0, canvas.z.max() + 1))
    if block is not None:
        front = np.float32(-p.half_depth_front_mm + p.fat_mm + 4)
        half_width = np.clip(4 + 0.15 * (block.z + 45), 0, 12)  # the xiphoid narrows downwards
        plate = (block.y > front) & (block.y < front + 9) & (np.abs(block.x) < half_width)
        canvas.paint(block, plate, MARROW, where=canvas.fat_inner)
        canvas.paint(block, plate & ((block.y < front + 1.5) | (block.y > front + 7.5)), BONE, where=canvas.fat_inner)


# FLARE's aorta and esophagus are labelled in abdominal scans, which reach the lower thorax at most:
# in a longer scan the two go on upwards unlabelled, above this height (reference frame, mm above the dome)
LABELLED_TOP_MM = 80.0


def _paint_great_vessels(canvas: Canvas, p: Patient) -> None:
    """Aorta (with iliac arteries below its bifurcation), IVC into the heart, esophagus to the stomach."""
    s = p.scale_xyz
    z = canvas.z
    zr = z / s[2]
    vb = _spine_centre(p, z)
    thoracic = np.clip((zr + 60) / 50, 0, 1)  # 0 in the abdomen, 1 above the hiatus
    radius = 11.5 * p.sizes["aorta"] * s[0]
    ax = (14 + 8 * thoracic) * s[0] + p.shifts["aorta"][0]
    ay = vb - (16 + radius / s[1]) * s[1] + 14 * thoracic * s[1] + p.shifts["aorta"][1] * 0.3
    aorta = (z > p.bifurcation_z_mm)
    labelled = z <= LABELLED_TOP_MM * s[2]
    for cx, cy, r, keep, label in (
        (ax, ay, np.full_like(z, radius), aorta & labelled, 5),
        (ax, ay, np.full_like(z, radius), aorta & ~labelled, ARTERY),
        (ax + 0.45 * (p.bifurcation_z_mm - z), ay, np.full_like(z, 0.6 * radius), ~aorta, ARTERY),  # iliac arteries
        (ax - 0.45 * (p.bifurcation_z_mm - z), ay, np.full_like(z, 0.6 * radius), ~aorta, ARTERY),
    ):
        _paint_vertical(canvas, cx, cy, r, r, keep, label)
    # IVC: right of the aorta, flattened; through the liver's back to the right atrium
    intrahepatic = np.clip((zr + 95) / 40, 0, 1)
    ix = (-24 - 4 * intrahepatic) * s[0] + p.shifts["ivc"][0]
    iy = vb - (30 + 8 * intrahepatic) * s[1] + p.shifts["ivc"][1] * 0.3
    top = 8 * s[2]
    bottom = p.bifurcation_z_mm - 15
    ivc_r = 12 * p.sizes["ivc"] * s[0]
    _paint_vertical(canvas, ix, iy, np.full_like(z, ivc_r * 1.15), np.full_like(z, ivc_r * 0.8),
                    (z < top) & (z > bottom), 6)
    for side in (-1, 1):
        _paint_vertical(canvas, ix + side * 0.45 * (bottom - z), iy + 4, np.full_like(z, 0.6 * ivc_r),
                        np.full_like(z, 0.5 * ivc_r), z <= bottom, VEIN)
    # esophagus: in front of the spine beside the aorta, then left and forward through the hiatus
    hiatus = p.at("esophagus", 24, -8, -32)
    cardia = p.at("stomach", 44, 10, -52)
    top_z = float(canvas.z.max()) + 10
    points = [(6 * s[0] + p.shifts["esophagus"][0], float(_spine_centre(p, np.float32(top_z))) - 24 * s[1], top_z),
              (8 * s[0] + p.shifts["esophagus"][0], float(_spine_centre(p, np.float32(0))) - 26 * s[1], 0.0),
              hiatus, cardia]
    shape = canvas.tube(points, [8 * s[0], 8 * s[0], 8.5 * s[0], 10 * s[0]], flatten_xyz=(1.0, 0.75, 1.0))
    if shape:
        block, rho2 = shape
        region = canvas.tissue[block.slices]
        tube = (rho2 <= 1) & ~np.isin(region, (5, ARTERY, BONE, MARROW, DISC, AIR, TABLE_CORE, TABLE_SHELL))
        high = block.z > LABELLED_TOP_MM * s[2]
        region[tube & ~high] = 10
        region[tube & high] = SOFT


def _paint_vertical(canvas: Canvas, cx: np.ndarray, cy: np.ndarray, rx: np.ndarray, ry: np.ndarray,
                    keep: np.ndarray, tissue: int) -> None:
    """A tube along z with a centre and radii per slice; cheap, since it is 2D per slice."""
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        return
    sl = slice(rows[0], rows[-1] + 1)
    reach = float(np.max(np.maximum(rx[sl], ry[sl])))
    xs = slice(*np.searchsorted(canvas.x, [float(np.min(cx[sl])) - reach, float(np.max(cx[sl])) + reach]))
    ys = slice(*np.searchsorted(canvas.y, [float(np.min(cy[sl])) - reach, float(np.max(cy[sl])) + reach]))
    x, y = canvas.x[xs][None, None, :], canvas.y[ys][None, :, None]
    c = lambda v: np.asarray(v, np.float32)[sl][:, None, None]  # noqa: E731
    inside = ((x - c(cx)) / c(rx)) ** 2 + ((y - c(cy)) / c(ry)) ** 2 <= 1
    inside &= c(keep).astype(bool)
    region = canvas.tissue[sl, ys, xs]
    region[inside & ~np.isin(region, (BONE, MARROW, DISC, CSF))] = tissue


def _paint_lesions(canvas: Canvas, lesions: Sequence[Lesion]) -> None:
    for lesion in lesions:
        shape = canvas.ellipsoid(lesion.centre_xyz_mm, lesion.radii_mm, lesion.rotation)
        if not shape:
            continue
        block, rho2 = shape
        region = canvas.tissue[block.slices]
        mask = (rho2 <= 1) & np.isin(region & TISSUE_MASK, lesion.host)
        region[mask] = (region[mask] & TISSUE_MASK) | (lesion.kind << LESION_SHIFT)


# ---- the template anatomy ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _template(path: Path, step_mm: float = 1.5) -> tuple[np.ndarray, Grid]:
    """The real label map and its CT as a tissue map on a finer axis-aligned (LPS) grid: organs by
    smoothed one-hot upsampling, fat, muscle, bone, lung and air by thresholds on the upsampled CT."""
    labels_image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")  # identity direction
    ct_path = path.with_name(path.name.replace(".nii.gz", "_0000.nii.gz"))
    ct_image = sitk.DICOMOrient(sitk.ReadImage(str(ct_path)), "LPS")
    labels = sitk.GetArrayFromImage(labels_image)
    ct = sitk.GetArrayFromImage(ct_image).astype(np.float32)
    spacing = np.array(labels_image.GetSpacing()[::-1])
    zoom = spacing / step_mm
    ct_fine = ndimage.zoom(ct, zoom, order=1)
    best = np.zeros(ct_fine.shape, np.float32)
    organ = np.zeros(ct_fine.shape, np.uint8)
    for label in range(1, 14):
        if not (labels == label).any():
            continue
        score = ndimage.zoom(ndimage.gaussian_filter((labels == label).astype(np.float32), 0.5), zoom, order=1)
        take = score > np.maximum(best, 0.35)
        organ[take], best[take] = label, score[take]
    tissue = np.full(ct_fine.shape, AIR, np.uint8)
    body = ndimage.binary_fill_holes(ndimage.binary_opening(ct_fine > -400, iterations=2))
    tissue[body] = SOFT
    tissue[body & (ct_fine < -400)] = GAS
    tissue[body & (ct_fine >= -400) & (ct_fine < -25)] = FAT
    tissue[body & (ct_fine > 170)] = MARROW
    tissue[body & (ct_fine > 330)] = BONE
    tissue[organ > 0] = organ[organ > 0]
    # zoom maps first to first and last to last voxel centre: the fine spacing follows from the sizes
    fine_spacing = (np.array(labels.shape) - 1) * spacing / (np.array(tissue.shape) - 1)
    grid = Grid(tuple(int(n) for n in tissue.shape), tuple(float(s) for s in fine_spacing),
                tuple(float(o) for o in labels_image.GetOrigin()))
    return tissue, grid


def _template_case(rng: np.random.Generator, template_path: Path, *, orientation: str | None,
                   spacing_zyx_mm: Sequence[float] | None, spacing_scale: float,
                   shape_zyx: Sequence[int] | None) -> tuple[np.ndarray, Grid]:
    """The template's anatomy, with lesions, smoothly deformed and resampled onto a random grid."""
    base, template_grid = _template(Path(template_path))
    tissue = base.copy()
    lut = organ_lookup()
    organs = lut[tissue]
    canvas = Canvas(template_grid)
    canvas.tissue = tissue
    present = [label for label in (1, 2, 3, 4, 13) if (organs == label).any()]
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
        label = int(rng.choice(present))
        candidates = np.argwhere(organs == label)
        k, j, i = candidates[rng.integers(len(candidates))]
        centre = np.array([canvas.x[i], canvas.y[j], canvas.z[k]], float)
        radius = float(np.exp(rng.uniform(np.log(4), np.log(18))))
        kind = int(rng.choice([SOLID, CYST, HYPERVASCULAR], p=[0.5, 0.3, 0.2]))
        _paint_lesions(canvas, [Lesion(centre, radius * rng.uniform(0.8, 1.2, 3), _rotation(rng.uniform(-90, 90, 3)),
                                       kind, (label,))])
    corners = template_grid.corners_xyz_mm()
    centre = corners.mean(0)
    extent = corners.max(0) - corners.min(0)
    grid = random_grid(rng, centre_xyz_mm=centre + rng.normal(0, 5, 3), body_width_mm=float(extent[0]) * 0.92,
                       orientation=orientation, spacing_zyx_mm=spacing_zyx_mm, spacing_scale=spacing_scale,
                       shape_zyx=shape_zyx, z_length_mm=float(extent[2]) * rng.uniform(0.85, 1.0))
    # smooth random displacement (up to ~8 mm) on a 20 mm lattice, and a global scaling about the centre
    lattice_mm = 20.0
    size = np.ceil(extent / lattice_mm).astype(int) + 3
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(size[::-1]), 1.5) for _ in range(3)], axis=-1)
    field *= rng.uniform(3, 8) / max(float(np.abs(field).max()), 1e-6)
    displacement = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    displacement.SetSpacing((lattice_mm,) * 3)
    displacement.SetOrigin(tuple(float(v) for v in corners.min(0) - lattice_mm))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(float(v) for v in centre))
    affine.SetMatrix(tuple((_rotation([0, 0, rng.uniform(-4, 4)]) @ np.diag(rng.uniform(0.9, 1.1, 3))).ravel()))
    transform = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(displacement)])
    return _resample_labels(tissue, template_grid, grid, transform), grid


# ---- rendering --------------------------------------------------------------------------------------------

def _lookup(values: dict[int, float], lesion_values: dict[int, float]) -> np.ndarray:
    lut = np.zeros(256, np.float32)
    for tissue_id, value in values.items():
        lut[tissue_id] = value
    for kind, value in lesion_values.items():
        lut[kind << LESION_SHIFT : (kind + 1) << LESION_SHIFT] = value
    return lut


def _textured(tissue: np.ndarray, values: np.ndarray, amplitude: np.ndarray, rng: np.random.Generator,
              spacing_zyx_mm: Sequence[float], feature_mm: float = 5.0) -> np.ndarray:
    """values[tissue] + amplitude[tissue] * (unit smooth noise of ~`feature_mm` grain), as float32.

    The noise lives on a coarse grid; each slice interpolates it in-plane from its two nearest coarse
    slices, so no full-size temporaries are made (this is the costly step on a 512 x 512 x 100 grid)."""
    shape = tissue.shape
    coarse = tuple(max(2, int(n * s / feature_mm) + 2) for n, s in zip(shape, spacing_zyx_mm, strict=True))
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 0.7)
    noise /= max(float(noise.std()), 1e-6)
    rows, cols = (np.linspace(0, c - 1, n, dtype=np.float32) for c, n in zip(coarse[1:], shape[1:], strict=True))
    planes = functools.lru_cache(maxsize=4)(lambda k: _interp_axis(_interp_axis(noise[k], 1, cols), 0, rows))
    image = np.empty(shape, np.float32)
    for k, position in enumerate(np.linspace(0, coarse[0] - 1, shape[0])):
        low = min(int(position), coarse[0] - 2)
        weight = np.float32(position - low)
        plane = planes(low) * (1 - weight) + planes(low + 1) * weight
        image[k] = values[tissue[k]] + amplitude[tissue[k]] * plane
    return image


def _psf_sigma(spacing_zyx_mm: Sequence[float]) -> tuple[float, ...]:
    """Scanner blur in voxels: ~0.45 mm in-plane, a third of the slice across slices (partial volume)."""
    sz, sy, sx = spacing_zyx_mm
    return (min(0.35, 1.2 / sz), 0.45 / sy, 0.45 / sx)


def render_ct(tissue: np.ndarray, spacing_zyx_mm: Sequence[float], rng: np.random.Generator, *, phase: str,
              oral_contrast: bool = False, noise_hu: float | None = None) -> np.ndarray:
    """Hounsfield units (int16) of a tissue map in one contrast phase."""
    column = PHASES.index(phase)
    dose = rng.uniform(0.8, 1.2)  # contrast enhancement varies with dose and timing
    values = {}
    for tissue_id, t in TISSUES.items():
        enhancement = (t.hu[column] - t.hu[0]) * dose
        # patients differ: parenchyma by about +-8 HU (fatty liver, iron, age), fluids and gas hardly
        spread = 8.0 if 1 <= t.organ <= 13 and t.hu[0] > 20 else 3.0
        values[tissue_id] = t.hu[0] + enhancement + rng.normal(0, spread)
    # fatty infiltration of the pancreas (and fat between the adrenal limbs): up to a third fat by volume
    for tissue_id in (4, 7, 8):
        values[tissue_id] += rng.uniform(0, 0.35) * (values[FAT] - values[tissue_id])
    if oral_contrast:
        values[BOWEL_FLUID] = rng.uniform(180, 320)
    lesions = {kind: t.hu[0] + (t.hu[column] - t.hu[0]) * dose + rng.normal(0, 5) for kind, t in LESION_KINDS.items()}
    amplitude = _lookup({i: t.texture for i, t in TISSUES.items()}, {k: t.texture for k, t in LESION_KINDS.items()})
    if column == 1:
        amplitude[3] *= 3  # the spleen's arterial-phase mottling
    image = _textured(tissue, _lookup(values, lesions), amplitude, rng, spacing_zyx_mm)
    image = ndimage.gaussian_filter(image, _psf_sigma(spacing_zyx_mm), truncate=3.0)
    sigma = noise_hu if noise_hu is not None else rng.uniform(7, 18)
    image += _correlated_noise(rng, tissue.shape, sigma, spacing_zyx_mm)
    # outside the reconstruction circle the scanner writes padding
    ny, nx = tissue.shape[1:]
    yy, xx = np.ogrid[:ny, :nx]
    outside = ((yy - (ny - 1) / 2) / (ny / 2)) ** 2 + ((xx - (nx - 1) / 2) / (nx / 2)) ** 2 > 1
    image[:, outside] = -1024
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _correlated_noise(rng: np.random.Generator, shape_zyx: Sequence[int], sigma: float,
                      spacing_zyx_mm: Sequence[float]) -> np.ndarray:
    """Gaussian noise with CT's fine in-plane grain (~0.7 mm), scaled to standard deviation `sigma`."""
    grain = (0.0, 0.7 / spacing_zyx_mm[1], 0.7 / spacing_zyx_mm[2])
    noise = ndimage.gaussian_filter(rng.standard_normal(tuple(shape_zyx), dtype=np.float32), grain, truncate=3.0)
    gain = 1.0
    for s in grain[1:]:
        kernel = ndimage.gaussian_filter1d(np.eye(1, 21, 10).ravel(), s, truncate=3.0)
        gain *= float(np.sqrt((kernel**2).sum()))
    return noise * np.float32(sigma / gain)


def render_mri(tissue: np.ndarray, spacing_zyx_mm: Sequence[float], rng: np.random.Generator, *,
               sequence: str) -> np.ndarray:
    """MRI-like signal (float32, arbitrary scale) of a tissue map: per-tissue T1- or T2-like intensity,
    texture, blur, a smooth multiplicative bias field, Rician noise."""
    if sequence not in ("t1", "t2"):
        raise ValueError(f"sequence {sequence!r}: expected t1 or t2")
    pick = (lambda t: t.t1) if sequence == "t1" else (lambda t: t.t2)
    values = {i: pick(t) * rng.uniform(0.9, 1.1) for i, t in TISSUES.items()}
    lesions = {k: pick(t) * rng.uniform(0.9, 1.1) for k, t in LESION_KINDS.items()}
    lut = _lookup(values, lesions)
    image = _textured(tissue, lut, lut * np.float32(0.04), rng, spacing_zyx_mm)
    image = ndimage.gaussian_filter(image, _psf_sigma(spacing_zyx_mm), truncate=3.0)
    # coil sensitivity: smooth, typically varying by 20-60 % across the field of view
    nz, ny, nx = tissue.shape
    zz, yy, xx = (np.linspace(-1, 1, n, dtype=np.float32) for n in (nz, ny, nx))
    a = rng.normal(0, 0.12, 6).astype(np.float32)
    log_bias_yx = a[0] * xx[None, :] + a[1] * yy[:, None] + a[2] * xx[None, :] * yy[:, None] - a[3] * yy[:, None] ** 2
    image *= np.exp(log_bias_yx[None] + (a[4] * zz + a[5] * zz**2)[:, None, None])
    image *= np.float32(np.exp(rng.uniform(np.log(50), np.log(5000))))  # the scanner's arbitrary scale
    sigma = np.float32(rng.uniform(0.015, 0.04) * float(np.percentile(image[:: 4, ::4, ::4], 95)))
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)  # magnitude of complex Gaussian noise: Rician


# ---- cases -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phantom:
    """One generated case: arrays (z, y, x) and the geometry to write them with."""

    image_zyx: np.ndarray  # int16 HU (CT) or float32 (MRI)
    organs_zyx: np.ndarray  # uint8 FLARE organ labels 0..13
    lesions_zyx: np.ndarray  # uint8, 1 = lesion
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # SimpleITK's 9 numbers, row-major
    modality: str  # ct, t1 or t2
    phase: str  # contrast phase (CT) or sequence (MRI)

    @property
    def grid(self) -> Grid:
        return Grid(tuple(self.image_zyx.shape), self.spacing_zyx_mm, self.origin_xyz_mm, self.direction)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r}: expected one of {tuple(choices)}")


def _render(tissue: np.ndarray, grid: Grid, rng: np.random.Generator, modality: str, phase: str | None,
            oral_contrast: bool) -> Phantom:
    lut = organ_lookup()
    if modality == "ct":
        phase = phase or str(rng.choice(PHASES))
        _check_choice("phase", phase, PHASES)
        image = render_ct(tissue, grid.spacing_zyx_mm, rng, phase=phase, oral_contrast=oral_contrast)
    else:
        image = render_mri(tissue, grid.spacing_zyx_mm, rng, sequence=modality)
        phase = modality
    return Phantom(image, lut[tissue], (tissue >> LESION_SHIFT > 0).astype(np.uint8), grid.spacing_zyx_mm,
                   grid.origin_xyz_mm, grid.direction, modality, phase)


def _paint_on(patient: Patient, grids: Sequence[Grid]) -> list[np.ndarray]:
    """The patient's tissue map on each grid: painted once on an axis-aligned grid, then resampled."""
    identity = Grid((1, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)).direction
    if len(grids) == 1 and grids[0].direction == identity:
        return [paint_synthetic(patient, grids[0])]
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    if len(grids) == 1 and grids[0].direction == ras:
        # same voxel centres as an LPS grid whose x and y run the other way: flip, no resampling
        g = grids[0]
        corner = g.corners_xyz_mm()
        lps = Grid(g.shape_zyx, g.spacing_zyx_mm, tuple(float(v) for v in corner.min(0)))
        return [np.ascontiguousarray(paint_synthetic(patient, lps)[:, ::-1, ::-1])]
    canvas_grid = _covering_grid(grids)
    tissue = paint_synthetic(patient, canvas_grid)
    return [_resample_labels(tissue, canvas_grid, g) for g in grids]


def generate_case(seed: int, *, modality: str = "ct", anatomy: str = "synthetic", phase: str | None = None,
                  orientation: str | None = None, spacing_zyx_mm: Sequence[float] | None = None,
                  spacing_scale: float = 1.0, shape_zyx: Sequence[int] | None = None, n_lesions: int | None = None,
                  min_lesions: int = 0, top_mm: float | None = None, long_fov: bool = False,
                  template: str | Path = TEMPLATE_LABELS) -> Phantom:
    """One phantom, identical for identical arguments.

    modality: ct, t1 or t2. anatomy: synthetic, or template (a real label map, elastically deformed).
    phase: CT contrast phase (random if None). orientation: lps, ras or oblique (random if None).
    spacing_zyx_mm / shape_zyx: fix the grid (random if None); spacing_scale > 1 coarsens it (the
    field of view stays). A 512 x 512 x 100 CT takes a few seconds."""
    _check_choice("modality", modality, MODALITIES)
    _check_choice("anatomy", anatomy, ANATOMIES)
    rng = np.random.default_rng(seed)
    if anatomy == "template":
        tissue, grid = _template_case(rng, Path(template), orientation=orientation, spacing_zyx_mm=spacing_zyx_mm,
                                      spacing_scale=spacing_scale, shape_zyx=shape_zyx)
        return _render(tissue, grid, rng, modality, phase, oral_contrast=False)
    patient = draw_patient(rng, n_lesions=n_lesions, min_lesions=min_lesions)
    grid = _patient_grid(rng, patient, orientation, spacing_zyx_mm, spacing_scale, shape_zyx, top_mm, long_fov)
    (tissue,) = _paint_on(patient, [grid])
    return _render(tissue, grid, rng, modality, phase, patient.oral_contrast)


def _patient_grid(rng: np.random.Generator, patient: Patient, orientation: str | None,
                  spacing_zyx_mm: Sequence[float] | None, spacing_scale: float,
                  shape_zyx: Sequence[int] | None, top_mm: float | None = None, long_fov: bool = False) -> Grid:
    # most scans cover the abdomen; a fifth are short slabs (a limited or split acquisition)
    length = float(rng.uniform(160, 320) if rng.random() < 0.8 else rng.uniform(80, 160))
    top = float(rng.uniform(-15, 50)) * patient.scale_xyz[2]  # from above the domes to below them
    if long_fov:  # drawn after the rest: an abdominal case's draws stay as they were
        top, length = float(rng.uniform(80, 250)), float(rng.uniform(500, 1100))
    if shape_zyx is not None and spacing_zyx_mm is not None:
        length = shape_zyx[0] * spacing_zyx_mm[0] * spacing_scale
    if top_mm is not None:
        top = top_mm
    centre = (rng.uniform(-15, 15), rng.uniform(-15, 15), top - length / 2)
    return random_grid(rng, centre_xyz_mm=centre, body_width_mm=2 * patient.half_width_mm, orientation=orientation,
                       spacing_zyx_mm=spacing_zyx_mm, spacing_scale=spacing_scale, shape_zyx=shape_zyx,
                       z_length_mm=length)


def generate_patient_sequences(seed: int, sequences: Sequence[str] = ("t1", "t2"), *,
                               spacing_zyx_mm: Sequence[float] | None = None, spacing_scale: float = 1.0,
                               shape_zyx: Sequence[int] | None = None,
                               max_shift_mm: float = 5.0, max_rotation_deg: float = 3.0) -> dict[str, Phantom]:
    """One synthetic patient scanned with several MRI sequences: the same anatomy, each sequence's grid
    moved by a small random rigid transform (the patient moved between acquisitions)."""
    for sequence in sequences:
        _check_choice("sequence", sequence, ("t1", "t2"))
    rng = np.random.default_rng(seed)
    patient = draw_patient(rng)
    base = _patient_grid(rng, patient, "lps", spacing_zyx_mm, spacing_scale, shape_zyx)
    grids = [base]
    centre = base.corners_xyz_mm().mean(0)
    for _ in sequences[1:]:
        rotation = _rotation(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
        shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
        direction = rotation @ np.asarray(base.direction).reshape(3, 3)
        origin = centre + rotation @ (np.asarray(base.origin_xyz_mm) - centre) + shift
        grids.append(Grid(base.shape_zyx, base.spacing_zyx_mm, tuple(float(v) for v in origin),
                          tuple(float(v) for v in direction.ravel())))
    tissues = _paint_on(patient, grids)
    return {sequence: _render(tissue, grid, rng, sequence, None, False)
            for sequence, tissue, grid in zip(sequences, tissues, grids, strict=True)}


# ---- writing ----------------------------------------------------------------------------------------------

def write_case(phantom: Phantom, images_dir: str | Path, labels_dir: str | Path | None, case_id: str,
               label_set: str = "organs") -> Path:
    """`<case>_0000.nii.gz` into images_dir and `<case>.nii.gz` (organs or lesion) into labels_dir,
    each written under a temporary name and renamed, labels first: an image on disk has its labels."""
    _check_choice("label_set", label_set, ("organs", "lesion"))
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        labels_dir.mkdir(parents=True, exist_ok=True)
        labels = phantom.organs_zyx if label_set == "organs" else phantom.lesions_zyx
        _write_atomic(_to_sitk(labels, phantom.grid), labels_dir / f"{case_id}.nii.gz")
    path = images_dir / f"{case_id}_0000.nii.gz"
    _write_atomic(_to_sitk(phantom.image_zyx, phantom.grid), path)
    return path


def _write_atomic(image: sitk.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    sitk.WriteImage(image, str(tmp), True)
    os.replace(tmp, path)


def write_dataset(out_dir: str | Path, n_cases: int, seed: int, *, modality: str = "ct", label_set: str = "organs",
                  anatomy: str = "synthetic", spacing_zyx_mm: Sequence[float] | None = None,
                  spacing_scale: float = 1.0, prefix: str = "phantom", phases: Sequence[str] | None = None,
                  on_case: Callable[[str, float], None] | None = None, keep_existing: bool = False,
                  long_every: int = 0) -> Path:
    """An nnU-Net raw dataset: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json.
    Case n uses seed `seed + n`; `on_case(case_id, seconds)` is called after each. A lesion dataset's
    patients hold at least one lesion each (cancer patients, as in FLARE's Task 1; it may still lie
    outside the field of view), an organ dataset's 0 to 5. phases: the CT
    contrast phases the cases take in turn (None: each case draws one of all three). keep_existing:
    a case whose image is already there is not made again (an interrupted run goes on). long_every:
    every n-th case (from the first) has a thorax-to-thighs field of view (0: none)."""
    _check_choice("label_set", label_set, ("organs", "lesion"))
    for phase in phases or ():
        _check_choice("phase", phase, PHASES)
    out_dir = Path(out_dir)
    for n in range(n_cases):
        start = time.perf_counter()
        case_id = f"{prefix}_{seed + n:04d}"
        if keep_existing and (out_dir / "imagesTr" / f"{case_id}_0000.nii.gz").is_file():
            continue
        phantom = generate_case(seed + n, modality=modality, anatomy=anatomy, spacing_zyx_mm=spacing_zyx_mm,
                                spacing_scale=spacing_scale, phase=phases[n % len(phases)] if phases else None,
                                min_lesions=1 if label_set == "lesion" else 0,
                                long_fov=long_every > 0 and n % long_every == 0)
        write_case(phantom, out_dir / "imagesTr", out_dir / "labelsTr", case_id, label_set)
        if on_case is not None:
            on_case(case_id, time.perf_counter() - start)
    dataset = {"channel_names": {"0": "CT" if modality == "ct" else "MRI"},
               "labels": ORGAN_LABELS if label_set == "organs" else LESION_LABELS,
               "numTraining": n_cases, "file_ending": ".nii.gz",
               "name": f"flarebox synthetic {modality} phantoms ({anatomy}, seed {seed})"}
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder to write (nnU-Net raw layout)")
    parser.add_argument("--n", type=int, default=10, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="case n uses seed + n")
    parser.add_argument("--modality", default="ct", choices=MODALITIES)
    parser.add_argument("--label-set", default="organs", choices=("organs", "lesion"))
    parser.add_argument("--anatomy", default="synthetic", choices=ANATOMIES)
    parser.add_argument("--spacing-scale", type=float, default=1.0, help="> 1: coarser grids, same field of view")
    parser.add_argument("--phases", nargs="+", choices=PHASES, help="CT contrast phases the cases take in turn "
                        "(default: each case draws one of all three)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    write_dataset(args.out, args.n, args.seed, modality=args.modality, label_set=args.label_set, anatomy=args.anatomy,
                  spacing_scale=args.spacing_scale, phases=args.phases,
                  on_case=lambda case, s: log.info("%s: %.1f s", case, s))
    log.info("%d cases in %s (%.0f s)", args.n, args.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
