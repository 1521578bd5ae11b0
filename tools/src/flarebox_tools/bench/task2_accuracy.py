"""Task 2 accuracy of each speed setting against our own f32 result, on the bundled (trained) demo
model: held-out organ phantoms (never seen in training), thorax-to-thighs phantoms and the real
sample CT.

    python -m flarebox_tools.bench.task2_accuracy [--cases 10] [--long 2] [--configs openvino:int8 ...]
    python -m flarebox_tools.bench.task2_accuracy --reference openvino:int8:body=-500,fit=1,step=0.75 \
        --configs openvino:int8:body=-500,fit=1,step=0.75,locate=network   # the locate stage's cost

With --per-organ, each configuration's DSC loss per organ against the reference follows (the locate
stage must lose no organ the reference finds). --thin adds thorax-to-thighs phantoms of 800 slices
of 0.625 mm (the forced-spacing rule's long case: `forced=1`).

Prints mean DSC over the 13 organs per configuration and its loss in DSC points against
`openvino:f32` (issue 7 allows at most 0.5 points for the shipped default), and the same over the
organs the f32 reference finds (a demo model finds only some; the rest score 0 and dilute the
mean). Configurations use the same `backend:precision[:option=value,...]` grammar as
flarebox_tools.bench.task2.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from flarebox_tools.paths import REPO as ROOT

MODEL = ROOT / "task2_cpu_organs" / "weights" / "model"
REFERENCE = "openvino:f32"
LONG_SEED = 30_000  # thorax-to-thighs phantoms: neither training, held-out nor the speed bench's seeds
THIN_SEED = 31_000
# the last is Task 2's shipped configuration
CONFIGS = [REFERENCE, "openvino:bf16", "openvino:int8", "openvino:int8:body=-500,fit=1",
           "openvino:int8:body=-500,fit=1,step=1", "openvino:int8:body=-500,fit=1,step=0.75"]


def predictor_for(spec: str, model: Path = MODEL):
    from flarebox.config import from_dict
    from flarebox.pipeline import Predictor
    from flarebox_tools.bench.task2 import config_sections

    return Predictor.from_config(from_dict({"model": {"folder": str(model)}, **config_sections(spec)}, ROOT))


def main() -> None:
    from flarebox import io
    from flarebox.cpu import cpu_description
    from flarebox_tools import phantoms
    from flarebox_tools.metrics import ORGAN_NAMES, score_case
    from flarebox_tools.paths import REAL_CT, REAL_LABELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=10_000)  # the demo's held-out seeds
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--reference", default=REFERENCE, help="the configuration the others are compared with")
    parser.add_argument("--long", type=int, default=0, help="thorax-to-thighs phantoms (512x512x300, 2.5 mm) to add")
    parser.add_argument("--thin", type=int, default=0, help="thorax-to-thighs phantoms (512x512x800, 0.625 mm) to add")
    parser.add_argument("--per-organ", action="store_true", help="DSC points lost per organ against the reference")
    parser.add_argument("--model", default=str(MODEL), help="the model folder (default: Task 2's bundled model)")
    args = parser.parse_args()
    configs = [args.reference] + [c for c in args.configs if c != args.reference]
    with tempfile.TemporaryDirectory() as tmp:
        data = phantoms.write_dataset(Path(tmp) / "held_out", args.cases, args.seed, label_set="organs")
        cases = [(p, data / "labelsTr" / p.name.replace("_0000", ""))
                 for p in sorted((data / "imagesTr").glob("*_0000.nii.gz"))]
        for n in range(args.long):
            phantom = phantoms.generate_case(LONG_SEED + n, spacing_zyx_mm=(2.5, 0.8, 0.8), shape_zyx=(300, 512, 512),
                                             top_mm=200.0 - 50 * n)
            image = phantoms.write_case(phantom, data / "imagesTr", data / "labelsTr", f"long_{n}", "organs")
            cases.append((image, data / "labelsTr" / f"long_{n}.nii.gz"))
        for n in range(args.thin):
            phantom = phantoms.generate_case(THIN_SEED + n, spacing_zyx_mm=(0.625, 0.8, 0.8),
                                             shape_zyx=(800, 512, 512), top_mm=150.0)
            image = phantoms.write_case(phantom, data / "imagesTr", data / "labelsTr", f"thin_{n}", "organs")
            cases.append((image, data / "labelsTr" / f"thin_{n}.nii.gz"))
        if REAL_LABELS.is_file():
            cases.append((REAL_CT, REAL_LABELS))
        volumes = [(io.read_image(image), io.read_image(labels).array_zyx.astype(np.uint8))
                   for image, labels in cases]
    results = {}
    for spec in configs:
        predictor = predictor_for(spec, Path(args.model))
        dsc, nsd, seconds = [], [], []
        for volume, reference in volumes:
            start = time.perf_counter()
            labels = predictor.segment(io.Volume(volume.array_zyx.copy(), volume.geometry))
            seconds.append(time.perf_counter() - start)
            scores = score_case(labels, reference, volume.geometry.spacing_zyx_mm, "organs")
            dsc.append([scores[name]["dsc"] for name in ORGAN_NAMES])
            nsd.append([scores[name]["nsd"] for name in ORGAN_NAMES])
        # (cases, organs); the real CT last
        results[spec] = (np.asarray(dsc, dtype=float), sum(seconds), np.asarray(nsd, dtype=float), seconds)
    ref = results[args.reference][0]
    # A demo model finds only some organs; the others score 0 everywhere and dilute the 13-organ
    # mean, so losses are also given over the organs the f32 reference finds on the phantoms.
    found = [] if ref is None else [i for i in range(len(ORGAN_NAMES)) if np.nanmean(ref[:-1, i]) >= 0.5]
    print(f"\nCPU: {cpu_description()}" + (f"; ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}"
                                             if "ONEDNN_MAX_CPU_ISA" in os.environ else ""))
    print(f"{len(volumes)} cases ({args.cases} held-out phantoms, {args.long} thorax to thighs, the real CT); "
          f"mean DSC over the 13 organs, and over the {len(found)} that {args.reference} finds on the phantoms "
          f"(mean DSC >= 0.5: "
          f"{', '.join(ORGAN_NAMES[i] for i in found) or 'none'})\n")
    print("| configuration | mean DSC phantoms | real CT | points lost vs reference (phantoms, real) "
          "| found organs: DSC phantoms | points lost | NSD phantoms | NSD real CT | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, (dsc, seconds, nsd, _) in results.items():
        mean13 = np.nanmean(dsc, axis=1)
        lost = found_dsc = found_lost = ""
        if ref is not None:
            ref13 = np.nanmean(ref, axis=1)
            lost = f"{100 * (ref13[:-1].mean() - mean13[:-1].mean()):+.2f}, {100 * (ref13[-1] - mean13[-1]):+.2f}"
        if found:
            found_dsc = f"{np.nanmean(dsc[:-1][:, found]):.4f}"
            found_lost = f"{100 * (np.nanmean(ref[:-1][:, found]) - np.nanmean(dsc[:-1][:, found])):+.2f}"
        nsd13 = np.nanmean(nsd, axis=1)
        print(f"| {spec} | {mean13[:-1].mean():.4f} | {mean13[-1]:.4f} | {lost} | {found_dsc} | {found_lost} "
              f"| {nsd13[:-1].mean():.4f} | {nsd13[-1]:.4f} | {seconds:.1f} |")
    if args.long or args.thin:
        names = [image.name.removesuffix("_0000.nii.gz") for image, _ in cases]
        print("\nPer case: slices, seconds and mean DSC per configuration\n")
        print("| case | slices | " + " | ".join(results) + " |")
        print("|---|---|" + "---|" * len(results))
        for i, (name, (volume, _)) in enumerate(zip(names, volumes, strict=True)):
            cells = [f"{r[3][i]:.1f} s, {np.nanmean(r[0][i]):.3f}" for r in results.values()]
            print(f"| {name} | {volume.array_zyx.shape[0]} | " + " | ".join(cells) + " |")
    if args.per_organ:
        print_per_organ(results, args.reference, ORGAN_NAMES)


def print_per_organ(results: dict, reference: str, names: list[str]) -> None:
    """DSC points lost per organ against the reference (mean over the phantoms; the real CT apart),
    and the organs the reference finds (DSC >= 0.1) in a case that the configuration misses (< 0.1)."""
    ref = results[reference][0]
    others = [spec for spec in results if spec != reference]
    print(f"\nDSC points lost per organ against {reference} (phantoms mean / real CT):\n")
    print("| organ | " + " | ".join(others) + " |")
    print("|---|" + "---|" * len(others))
    for i, name in enumerate(names):
        cells = []
        for spec in others:
            dsc = results[spec][0]
            cells.append(f"{100 * np.nanmean(ref[:-1, i] - dsc[:-1, i]):+.2f} / {100 * (ref[-1, i] - dsc[-1, i]):+.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for spec in others:
        lost = [(case, names[i]) for case, i in zip(*np.nonzero((ref >= 0.1) & (results[spec][0] < 0.1)), strict=True)]
        print(f"{spec}: organs the reference finds and it misses: {lost or 'none'}")


if __name__ == "__main__":
    main()
