"""Synthetic abdominal CT and MRI phantoms with the 13 FLARE organs and lesions (deterministic).

No FLARE data reaches us, so demo weights are trained and every claim is measured on these. A case
is drawn in patient coordinates (LPS, mm: x to the patient's left, y to the back, z up) and then
sampled on a voxel grid of random spacing, field of view and orientation, so labels and geometry
agree by construction. Anatomy: body outline with fat, muscle, spine, ribs and lung bases; the 13
organs as smoothly deformed ellipsoids and tubes at their usual places; lesions as spheres inside
organs and elsewhere. CT intensities follow tissue Hounsfield values with contrast-phase variation,
partial-volume blur and noise; MRI renderings remap tissues to T1/T2-like contrasts with a bias field
and Rician noise. A second anatomy mode deforms a real label map (../shared/data/real) elastically.

    python -m flarebox.phantoms --out DIR --n 20 --seed 0 [--modality ct|t1|t2] [--label-set organs|lesion]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ORGANS = ("liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava", "right_adrenal_gland",
          "left_adrenal_gland", "gallbladder", "esophagus", "stomach", "duodenum", "left_kidney")
ORGAN_LABELS = {"background": 0, **{name: i for i, name in enumerate(ORGANS, start=1)}}
LESION_LABELS = {"background": 0, "lesion": 1}

# Tissue ids of the rendering (organs keep their FLARE ids 1..13).
FAT, MUSCLE, BONE, LUNG, AIR, MARROW, LESION_DARK, LESION_BRIGHT, BOWEL = 20, 21, 22, 23, 24, 25, 26, 27, 28

# Hounsfield units per tissue: (non-contrast, arterial, portal-venous).
HU = {1: (60, 75, 120), 2: (35, 160, 150), 3: (50, 110, 120), 4: (45, 110, 95), 5: (45, 300, 160),
      6: (40, 70, 150), 7: (30, 70, 60), 8: (30, 70, 60), 9: (12, 12, 15), 10: (45, 60, 70), 11: (25, 50, 60),
      12: (35, 70, 80), 13: (35, 160, 150), FAT: (-100, -100, -100), MUSCLE: (50, 55, 60),
      BONE: (650, 650, 650), LUNG: (-850, -850, -850), AIR: (-1000, -1000, -1000), MARROW: (250, 260, 270),
      LESION_DARK: (30, 40, 55), LESION_BRIGHT: (50, 140, 100), BOWEL: (30, 45, 60)}
# Relative MRI signal per tissue (T1-like, T2-like): no physical scale.
MRI = {1: (0.62, 0.28), 2: (0.45, 0.55), 3: (0.40, 0.62), 4: (0.60, 0.40), 5: (0.15, 0.25), 6: (0.18, 0.30),
       7: (0.45, 0.40), 8: (0.45, 0.40), 9: (0.20, 0.95), 10: (0.40, 0.35), 11: (0.30, 0.70), 12: (0.35, 0.60),
       13: (0.45, 0.55), FAT: (0.95, 0.80), MUSCLE: (0.35, 0.22), BONE: (0.08, 0.08), LUNG: (0.03, 0.03),
       AIR: (0.0, 0.0), MARROW: (0.70, 0.50), LESION_DARK: (0.30, 0.80), LESION_BRIGHT: (0.50, 0.90),
       BOWEL: (0.35, 0.65)}
PHASES = ("non-contrast", "arterial", "portal-venous")


@dataclass(frozen=True)
class Phantom:
    image_zyx: np.ndarray  # int16 HU (CT) or float32 (MRI)
    organs_zyx: np.ndarray  # uint8, FLARE organ ids
    lesions_zyx: np.ndarray  # uint8, 1 = lesion
    spacing_zyx_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # SimpleITK's 9 numbers
    modality: str = "ct"
    phase: str = ""


# ---- geometry -------------------------------------------------------------------------------------

def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation about z (and a little about x) for oblique acquisitions."""
    a, b = np.deg2rad(rng.uniform(-max_deg, max_deg)), np.deg2rad(rng.uniform(-max_deg / 3, max_deg / 3))
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def random_grid(rng: np.random.Generator, orientation: str | None = None, scale: float = 1.0,
                spacing_zyx_mm: tuple[float, float, float] | None = None):
    """Spacing (0.6-1 mm in-plane, 1-5 mm slices, or as given), FOV, orientation (RAS/LPS/oblique)."""
    orientation = orientation or str(rng.choice(["lps", "ras", "oblique"]))
    spacing_xy = float(rng.uniform(0.6, 1.0)) * scale
    spacing_z = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0])) * scale
    if spacing_zyx_mm is not None:
        spacing_z, spacing_xy = float(spacing_zyx_mm[0]), float(spacing_zyx_mm[2])
    fov_xy = float(rng.uniform(340, 440))
    length_z = float(rng.uniform(180, 320))
    size = (int(round(fov_xy / spacing_xy)), int(round(fov_xy / spacing_xy)), max(8, int(round(length_z / spacing_z))))
    direction = {"lps": np.eye(3), "ras": np.diag([-1.0, -1.0, 1.0])}.get(orientation)
    if direction is None:
        direction = _rotation(rng, 15)
    spacing_xyz = np.array([spacing_xy, spacing_xy, spacing_z])
    # origin so that the grid centre lands near the patient's centre (z: around the kidneys)
    centre_index = (np.array(size) - 1) / 2
    centre_world = np.array([rng.uniform(-15, 15), rng.uniform(-10, 25), rng.uniform(0, 40)])
    origin = centre_world - direction @ (centre_index * spacing_xyz)
    return spacing_xyz, size, direction, origin


def world_coordinates(spacing_xyz, size, direction, origin, dtype=np.float32):
    """Patient (LPS) coordinates of every voxel as three (z, y, x) arrays."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=dtype) for n in size[::-1]], indexing="ij")
    m = (np.asarray(direction) * np.asarray(spacing_xyz)[None, :]).astype(dtype)
    return tuple(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + dtype(origin[r]) for r in range(3))


# ---- anatomy -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Body:
    ax: float  # body half-width (left-right), mm
    ay: float  # body half-depth (front-back), mm
    fat: float  # subcutaneous fat thickness, mm
    diaphragm_z: float
    organ_scale: float
    warp: tuple[np.ndarray, ...]  # random low-frequency deformation coefficients


def random_body(rng: np.random.Generator) -> Body:
    return Body(ax=float(rng.uniform(135, 185)), ay=float(rng.uniform(95, 135)), fat=float(rng.uniform(8, 35)),
                diaphragm_z=float(rng.uniform(95, 130)), organ_scale=float(rng.uniform(0.85, 1.15)),
                warp=tuple(rng.normal(0, 1, size=(3, 4)) for _ in range(3)))


def _warp(body: Body, x, y, z):
    """Smooth random displacement (mm) so organs are not perfect ellipsoids and differ per case."""
    out = []
    for coeff in body.warp:
        d = (coeff[0, 0] * np.sin(x / 53 + coeff[0, 1]) + coeff[1, 0] * np.sin(y / 41 + coeff[1, 1])
             + coeff[2, 0] * np.sin(z / 67 + coeff[2, 1]) + coeff[0, 2] * np.sin((x + z) / 37 + coeff[1, 2]))
        out.append(6.0 * d)
    return x + out[0], y + out[1], z + out[2]


def _ellipsoid(x, y, z, centre, radii, scale=1.0):
    cx, cy, cz = centre
    rx, ry, rz = (r * scale for r in radii)
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1


def _tube(x, y, z, cx, cy, radius, z_low, z_high):
    return ((x - cx) ** 2 + (y - cy) ** 2 <= radius**2) & (z >= z_low) & (z <= z_high)


def tissue_map(x, y, z, body: Body, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tissue ids (organs 1..13 plus the body's tissues) and a lesion mask at the given coordinates."""
    s = body.organ_scale
    wx, wy, wz = _warp(body, x, y, z)
    tissue = np.full(x.shape, AIR, np.uint8)
    outline = (x / body.ax) ** 2 + ((y - 10) / body.ay) ** 2
    inside = outline <= 1
    tissue[inside] = FAT
    inner = (x / (body.ax - body.fat)) ** 2 + ((y - 10) / (body.ay - body.fat)) ** 2 <= 1
    tissue[inner] = MUSCLE
    cavity = (x / (body.ax - body.fat - 14)) ** 2 + ((y - 5) / (body.ay - body.fat - 18)) ** 2 <= 1
    tissue[cavity & (y < 45)] = FAT  # intra-abdominal fat around the organs
    tissue[cavity & (y >= 45) & ~_tube(x, y, z, 0, 72, 45, -1e9, 1e9)] = FAT
    # lung bases above the diaphragm, laterally and behind
    # bowel loops with gas pockets fill much of the remaining cavity (label 0, as in FLARE)
    phase = body.warp[0][:, 3]
    loops = (np.sin(wx / 11 + phase[0]) + np.sin(wy / 9 + phase[1]) + np.sin(wz / 13 + phase[2])
             + np.sin((wx - wz) / 7 + phase[0] * 2))
    tissue[cavity & (loops > 0.3)] = BOWEL
    tissue[cavity & (loops > 2.6)] = AIR
    lung = cavity & (wz > body.diaphragm_z + 25 * np.cos(x / 60)) & (np.abs(x) > 25)
    tissue[lung] = LUNG
    # spine: vertebral bodies with marrow, the canal, and ribs
    vertebra = _tube(x, y, z, 0, 72, 19, -1e9, 1e9) & inside
    tissue[vertebra] = BONE
    tissue[_tube(x, y, z, 0, 72, 14, -1e9, 1e9) & inside] = MARROW
    tissue[_tube(x, y, z, 0, 100, 8, -1e9, 1e9) & inside] = MUSCLE
    rib_ring = np.abs(np.sqrt((x / (body.ax - body.fat - 7)) ** 2 + ((y - 8) / (body.ay - body.fat - 9)) ** 2) - 1)
    ribs = (rib_ring < 0.035) & (np.mod(z, 28) < 9) & (z > 20) & (y > -body.ay * 0.6)
    tissue[ribs & inside] = BONE

    d = body.diaphragm_z
    organs = [
        (11, _ellipsoid(wx, wy, wz, (55, -30, d - 45), (48, 38, 55), s)),  # stomach
        (3, _ellipsoid(wx, wy, wz, (88, 35, d - 40), (30, 42, 55), s)),  # spleen
        (1, _ellipsoid(wx, wy, wz, (-62, 0, d - 55), (80, 75, 75), s) & (wx < 30 + 0.4 * wy)),  # liver
        (9, _ellipsoid(wx, wy, wz, (-52, -48, d - 100), (16, 18, 32), s)),  # gallbladder
        (2, _ellipsoid(wx, wy, wz, (-68, 55, d - 140), (27, 25, 52), s)),  # right kidney
        (13, _ellipsoid(wx, wy, wz, (68, 55, d - 125), (27, 25, 52), s)),  # left kidney
        (7, _ellipsoid(wx, wy, wz, (-42, 48, d - 78), (9, 6, 20), s)),  # right adrenal
        (8, _ellipsoid(wx, wy, wz, (44, 46, d - 85), (9, 6, 20), s)),  # left adrenal
        (4, _ellipsoid(wx + 0.25 * (wx - 10), wy, wz - 0.18 * wx, (10, 12, d - 115), (62, 14, 14), s)),  # pancreas
        (12, (np.abs(np.sqrt((wx + 32) ** 2 + ((wz - (d - 130)) * 0.9) ** 2) - 30 * s) < 8 * s)
         & (np.abs(wy - 5) < 14) & (wx < -20)),  # duodenum, a C around the pancreas head
        (5, _tube(wx, wy, wz, 16, 42, 12 * s, -1e9, d + 40)),  # aorta
        (6, _tube(wx, wy, wz, -22, 38, 11 * s, d - 190, d + 20)),  # IVC
        (10, _tube(wx, wy, wz, 12, 40, 8 * s, d + 5, 1e9)),  # esophagus
    ]
    for label, mask in organs:
        tissue[mask & cavity] = label
    lesions = np.zeros(x.shape, bool)
    for _ in range(int(rng.integers(0, 4))):
        host = int(rng.choice([1, 1, 2, 3, 4, 13, 0]))
        cx, cy, cz = {1: (-62, 0, d - 55), 2: (-68, 55, d - 140), 3: (88, 35, d - 40), 4: (10, 12, d - 115),
                      13: (68, 55, d - 125), 0: (rng.uniform(-60, 60), rng.uniform(-40, 30), d - 120)}[host]
        centre = (cx + rng.uniform(-20, 20), cy + rng.uniform(-15, 15), cz + rng.uniform(-25, 25))
        radius = float(rng.uniform(5, 18))
        blob = _ellipsoid(wx, wy, wz, centre, (radius, radius * rng.uniform(0.8, 1.2), radius)) & cavity
        lesions |= blob
    return tissue, lesions


# ---- rendering -----------------------------------------------------------------------------------

def render_ct(tissue, lesions, spacing_zyx_mm, rng: np.random.Generator, phase: int) -> np.ndarray:
    lut = np.zeros(256, np.float32)
    for t, values in HU.items():
        lut[t] = values[phase] + rng.normal(0, 6)
    hu = lut[tissue]
    if lesions.any():
        hu[lesions] = HU[LESION_DARK if rng.random() < 0.7 else LESION_BRIGHT][phase] + rng.normal(0, 8)
    hu += ndimage.gaussian_filter(rng.normal(0, 12, tissue.shape).astype(np.float32), 1.5)  # organ texture
    sigma = [0.35 * min(1.0, 1.5 / s) for s in spacing_zyx_mm]  # partial volume: the scanner's PSF
    hu = ndimage.gaussian_filter(hu, sigma)
    hu += rng.normal(0, rng.uniform(8, 22), hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def render_mri(tissue, lesions, rng: np.random.Generator, sequence: str) -> np.ndarray:
    column = 0 if sequence == "t1" else 1
    lut = np.zeros(256, np.float32)
    for t, values in MRI.items():
        lut[t] = values[column] * rng.uniform(0.9, 1.1)
    signal = lut[tissue]
    if lesions.any():
        signal[lesions] = MRI[LESION_DARK][column]
    signal = ndimage.gaussian_filter(signal, 0.7)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in tissue.shape], indexing="ij")
    a = rng.normal(0, 0.25, size=4)
    bias = np.exp(a[0] * xx + a[1] * yy + a[2] * zz + a[3] * xx * yy)  # smooth coil sensitivity
    signal *= bias * rng.uniform(300, 3000)  # arbitrary scanner scale
    noise = rng.uniform(0.01, 0.04) * float(signal.max())
    real = signal + rng.normal(0, noise, signal.shape).astype(np.float32)
    imag = rng.normal(0, noise, signal.shape).astype(np.float32)
    return np.sqrt(real**2 + imag**2).astype(np.float32)  # magnitude: Rician noise


def generate_case(seed: int, *, modality: str = "ct", anatomy: str = "synthetic", orientation: str | None = None,
                  spacing_scale: float = 1.0, spacing_zyx_mm: tuple[float, float, float] | None = None,
                  template: Path | None = None) -> Phantom:
    """One phantom. modality: ct, t1 or t2; anatomy: synthetic, or template (a real label map,
    elastically deformed); spacing_scale > 1 or a coarse spacing_zyx_mm make smaller grids (fast
    training data: a 512x512x100 grid takes ~10 s, a 2.5 mm one well under 1 s)."""
    rng = np.random.default_rng(seed)
    if anatomy == "template":
        tissue, lesions, spacing_xyz, direction, origin = _template_anatomy(rng, template)
    else:
        spacing_xyz, size, direction, origin = random_grid(rng, orientation, spacing_scale, spacing_zyx_mm)
        x, y, z = world_coordinates(spacing_xyz, size, direction, origin)
        tissue, lesions = tissue_map(x, y, z, random_body(rng), rng)
    spacing_zyx = tuple(float(s) for s in np.asarray(spacing_xyz)[::-1])
    organs = np.where(tissue <= 13, tissue, 0).astype(np.uint8)
    phase = int(rng.integers(0, 3))
    if modality == "ct":
        image = render_ct(tissue, lesions, spacing_zyx, rng, phase)
    elif modality in ("t1", "t2"):
        image = render_mri(tissue, lesions, rng, modality)
    else:
        raise ValueError(f"modality {modality!r}: expected ct, t1 or t2")
    return Phantom(image, organs, lesions.astype(np.uint8), spacing_zyx, tuple(float(o) for o in origin),
                   tuple(float(d) for d in np.asarray(direction).ravel()), modality,
                   PHASES[phase] if modality == "ct" else modality)


def _template_anatomy(rng, template: Path | None):
    """A real label map (FLARE ids) and its CT's body, deformed by a smooth random displacement."""
    root = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "real"
    label_path = Path(template) if template else root / "ts_ct_sm.nii.gz"
    labels_img = sitk.ReadImage(str(label_path))
    labels = sitk.GetArrayFromImage(labels_img).astype(np.uint8)
    ct_path = label_path.with_name(label_path.name.replace(".nii.gz", "_0000.nii.gz"))
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path))) if ct_path.exists() else None
    shape = labels.shape
    field = [ndimage.gaussian_filter(rng.normal(0, 1, shape), 4) for _ in range(3)]
    field = [f / (np.abs(f).max() + 1e-6) * rng.uniform(1.5, 3.5) for f in field]  # voxels
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    coords = [g + f for g, f in zip(grid, field, strict=True)]
    warped = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    tissue = np.where(warped > 0, warped, FAT).astype(np.uint8)
    if ct is not None:
        ct_warped = ndimage.map_coordinates(ct.astype(np.float32), coords, order=1, mode="nearest")
        tissue[(warped == 0) & (ct_warped < -500)] = AIR
        tissue[(warped == 0) & (ct_warped > 250)] = BONE
        tissue[(warped == 0) & (ct_warped > -60) & (ct_warped <= 250)] = MUSCLE
    lesions = np.zeros(shape, bool)
    return tissue, lesions, np.array(labels_img.GetSpacing()), np.array(labels_img.GetDirection()).reshape(3, 3), \
        np.array(labels_img.GetOrigin())


def generate_patient_sequences(seed: int, sequences=("t1", "t2"), spacing_scale: float = 1.0) -> dict[str, Phantom]:
    """The same synthetic patient rendered as several MRI sequences, each slightly misaligned (a
    small rigid shift and rotation between acquisitions)."""
    rng = np.random.default_rng(seed)
    spacing_xyz, size, direction, origin = random_grid(rng, "lps", spacing_scale)
    body = random_body(rng)
    out = {}
    for n, sequence in enumerate(sequences):
        srng = np.random.default_rng([seed, n])
        moved = _rotation(srng, 3) @ direction if n else direction
        shift = srng.normal(0, 3, 3) if n else np.zeros(3)
        x, y, z = world_coordinates(spacing_xyz, size, moved, origin + shift)
        tissue, lesions = tissue_map(x, y, z, body, np.random.default_rng(seed))
        image = render_mri(tissue, lesions, srng, sequence)
        organs = np.where(tissue <= 13, tissue, 0).astype(np.uint8)
        out[sequence] = Phantom(image, organs, lesions.astype(np.uint8), tuple(float(s) for s in spacing_xyz[::-1]),
                                tuple(float(o) for o in origin + shift), tuple(float(d) for d in moved.ravel()),
                                sequence, sequence)
    return out


# ---- writing -------------------------------------------------------------------------------------

def _image(array: np.ndarray, phantom: Phantom) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(phantom.spacing_zyx_mm[::-1])
    image.SetOrigin(phantom.origin_xyz_mm)
    image.SetDirection(phantom.direction)
    return image


def write_case(phantom: Phantom, images_dir: Path, labels_dir: Path | None, case_id: str,
               label_set: str = "organs") -> Path:
    """`<case>_0000.nii.gz` in images_dir and `<case>.nii.gz` (organs or lesions) in labels_dir."""
    images_dir.mkdir(parents=True, exist_ok=True)
    path = images_dir / f"{case_id}_0000.nii.gz"
    sitk.WriteImage(_image(phantom.image_zyx, phantom), str(path), True)
    if labels_dir is not None:
        labels_dir.mkdir(parents=True, exist_ok=True)
        labels = phantom.organs_zyx if label_set == "organs" else phantom.lesions_zyx
        sitk.WriteImage(_image(labels, phantom), str(labels_dir / f"{case_id}.nii.gz"), True)
    return path


def write_dataset(out_dir: str | Path, n_cases: int, seed: int, *, modality: str = "ct", label_set: str = "organs",
                  anatomy: str = "synthetic", spacing_scale: float = 1.0,
                  spacing_zyx_mm: tuple[float, float, float] | None = None, prefix: str = "phantom") -> Path:
    """An nnU-Net raw dataset: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json."""
    out_dir = Path(out_dir)
    for n in range(n_cases):
        phantom = generate_case(seed + n, modality=modality, anatomy=anatomy, spacing_scale=spacing_scale,
                                spacing_zyx_mm=spacing_zyx_mm)
        write_case(phantom, out_dir / "imagesTr", out_dir / "labelsTr", f"{prefix}_{seed + n:04d}", label_set)
    dataset = {"channel_names": {"0": "CT" if modality == "ct" else "MRI"},
               "labels": ORGAN_LABELS if label_set == "organs" else LESION_LABELS,
               "numTraining": n_cases, "file_ending": ".nii.gz"}
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flarebox.phantoms", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality", default="ct", choices=("ct", "t1", "t2"))
    parser.add_argument("--label-set", default="organs", choices=("organs", "lesion"))
    parser.add_argument("--anatomy", default="synthetic", choices=("synthetic", "template"))
    parser.add_argument("--spacing-scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    write_dataset(args.out, args.n, args.seed, modality=args.modality, label_set=args.label_set,
                  anatomy=args.anatomy, spacing_scale=args.spacing_scale)
    return 0


__all__ = ["Phantom", "generate_case", "generate_patient_sequences", "write_case", "write_dataset", "replace"]

if __name__ == "__main__":
    raise SystemExit(main())
