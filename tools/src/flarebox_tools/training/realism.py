"""How close are the phantoms to a real CT? Per organ: Hounsfield units, volume, position, neighbours.

    python -m flarebox_tools.training.realism --real CT_0000.nii.gz LABELS.nii.gz --phantoms DATASET [--n 10]

Every image is first brought to the real CT's spacing (linear for the image, nearest for the labels),
so partial volume is alike on both sides. Per organ: mean and standard deviation of HU inside it,
volume in the field of view (cm3), the centroid's offset from the aorta's (x towards the patient's
left, y towards the back, mm, LPS) on the slices both hold, and the organs it touches. A phantom
column shows the median over the phantoms and, for the HU mean, its 10th to 90th percentile.

This reads the real CT's labels to describe them, never to make phantoms from or to train on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from flarebox_tools.metrics import ORGAN_NAMES

AORTA = 5


def _resampled(image: sitk.Image, labels: sitk.Image, spacing_xyz: tuple[float, ...]) -> tuple[sitk.Image, ...]:
    image, labels = sitk.DICOMOrient(image, "LPS"), sitk.DICOMOrient(labels, "LPS")
    size = [max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz, strict=True)]
    out = []
    for volume, method in ((image, sitk.sitkLinear), (labels, sitk.sitkNearestNeighbor)):
        out.append(sitk.Resample(volume, size, sitk.Transform(), method, volume.GetOrigin(), spacing_xyz,
                                 volume.GetDirection(), 0, volume.GetPixelID()))
    return tuple(out)


def organ_statistics(image: sitk.Image, labels: sitk.Image) -> dict[str, dict]:
    """Per organ present: hu_mean, hu_sd, volume_cm3, offset_from_aorta_mm (x, y) or None, touches."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(labels).astype(np.uint8)
    spacing_zyx = np.array(image.GetSpacing()[::-1])
    aorta = lab == AORTA
    out = {}
    for label, name in enumerate(ORGAN_NAMES, start=1):
        mask = lab == label
        if not mask.any():
            continue
        offset = None
        both = aorta.any((1, 2)) & mask.any((1, 2))
        if both.any():
            own = np.argwhere(mask & both[:, None, None]).mean(0)
            ref = np.argwhere(aorta & both[:, None, None]).mean(0)
            offset = tuple(float(v) for v in ((own - ref) * spacing_zyx)[[2, 1]])
        ring = ndimage.binary_dilation(mask, iterations=1) & ~mask
        touches = sorted(ORGAN_NAMES[k - 1] for k in np.unique(lab[ring]) if k)
        out[name] = {"hu_mean": float(hu[mask].mean()), "hu_sd": float(hu[mask].std()),
                     "volume_cm3": float(mask.sum() * spacing_zyx.prod() / 1000), "offset_from_aorta_mm": offset,
                     "touches": touches}
    return out


def compare(real_image: Path, real_labels: Path, phantoms_dir: Path, n: int) -> str:
    """A markdown table: the real CT beside the phantoms, per organ."""
    real_img, real_lab = sitk.ReadImage(str(real_image)), sitk.ReadImage(str(real_labels))
    spacing = real_img.GetSpacing()
    real = organ_statistics(*_resampled(real_img, real_lab, spacing))
    cases = sorted((phantoms_dir / "imagesTr").glob("*_0000.nii.gz"))[:n]
    stats = []
    for path in cases:
        labels = phantoms_dir / "labelsTr" / path.name.replace("_0000.nii.gz", ".nii.gz")
        stats.append(organ_statistics(*_resampled(sitk.ReadImage(str(path)), sitk.ReadImage(str(labels)), spacing)))
    lines = [f"Real CT {real_image.name} beside {len(cases)} phantoms of {phantoms_dir}, all at "
             f"{' x '.join(f'{s:g}' for s in spacing)} mm.", "",
             "| organ | HU real | HU phantoms (p10-p90) | cm3 real | cm3 phantoms | from aorta real (x, y mm) "
             "| from aorta phantoms | touches (real) | touches (phantoms, >= half) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in ORGAN_NAMES:
        r = real.get(name)
        ps = [s[name] for s in stats if name in s]
        if not ps and r is None:
            continue
        means = np.array([p["hu_mean"] for p in ps])
        offsets = np.array([p["offset_from_aorta_mm"] for p in ps if p["offset_from_aorta_mm"] is not None])
        touching = {t for p in ps for t in p["touches"]}
        common = sorted(t for t in touching if sum(t in p["touches"] for p in ps) >= len(ps) / 2)
        cells = [
            "absent" if r is None else f"{r['hu_mean']:.0f} ± {r['hu_sd']:.0f}",
            f"{np.median(means):.0f} ({np.percentile(means, 10):.0f} to {np.percentile(means, 90):.0f})" if ps else "-",
            "-" if r is None else f"{r['volume_cm3']:.0f}",
            f"{np.median([p['volume_cm3'] for p in ps]):.0f}" if ps else "-",
            "-" if r is None or r["offset_from_aorta_mm"] is None else "{:+.0f}, {:+.0f}".format(
                *r["offset_from_aorta_mm"]),
            "{:+.0f}, {:+.0f}".format(*np.median(offsets, 0)) if len(offsets) else "-",
            "-" if r is None else ", ".join(r["touches"]) or "-",
            ", ".join(common) or "-",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools realism", description=__doc__.splitlines()[0])
    parser.add_argument("--real", nargs=2, required=True, metavar=("IMAGE", "LABELS"))
    parser.add_argument("--phantoms", required=True, help="phantom dataset (imagesTr, labelsTr)")
    parser.add_argument("--n", type=int, default=10, help="phantoms to compare")
    args = parser.parse_args(argv)
    sys.stdout.write(compare(Path(args.real[0]), Path(args.real[1]), Path(args.phantoms), args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
