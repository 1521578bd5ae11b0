"""Task 2 accuracy of each speed setting against our own f32 result, on the bundled (trained) demo
model: held-out organ phantoms (never seen in training) and the real sample CT.

    python -m tests.bench.task2_accuracy [--cases 10] [--configs openvino:int8 ...]

Prints mean DSC over the 13 organs per configuration and its loss in DSC points against
`openvino:f32` (issue 7 allows at most 0.5 points for the shipped default). Configurations use the
same `backend:precision[:option=value,...]` grammar as tests.bench.task2.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "task2_cpu_organs" / "weights" / "model"
REFERENCE = "openvino:f32"
# the last is Task 2's shipped configuration
CONFIGS = [REFERENCE, "openvino:bf16", "openvino:int8", "openvino:int8:body=-500,fit=1",
           "openvino:int8:body=-500,fit=1,step=1", "openvino:int8:body=-500,fit=1,step=0.75"]


def predictor_for(spec: str):
    from flarebox.config import from_dict
    from flarebox.pipeline import Predictor
    from tests.bench.task2 import config_sections

    return Predictor.from_config(from_dict({"model": {"folder": str(MODEL)}, **config_sections(spec)}, ROOT))


def main() -> None:
    from flarebox import io, phantoms
    from flarebox.metrics import score_case
    from tests.conftest import REAL_CT, REAL_LABELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=10_000)  # the demo's held-out seeds
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = phantoms.write_dataset(Path(tmp) / "held_out", args.cases, args.seed, label_set="organs")
        cases = [(p, data / "labelsTr" / p.name.replace("_0000", ""))
                 for p in sorted((data / "imagesTr").glob("*_0000.nii.gz"))]
        if REAL_LABELS.is_file():
            cases.append((REAL_CT, REAL_LABELS))
        volumes = [(io.read_image(image), io.read_image(labels).array_zyx.astype(np.uint8))
                   for image, labels in cases]
    results = {}
    for spec in args.configs:
        predictor = predictor_for(spec)
        dsc, seconds = [], 0.0
        for volume, reference in volumes:
            start = time.perf_counter()
            labels = predictor.segment(io.Volume(volume.array_zyx.copy(), volume.geometry))
            seconds += time.perf_counter() - start
            scores = score_case(labels, reference, volume.geometry.spacing_zyx_mm, "organs")
            dsc.append(np.nanmean([s["dsc"] for s in scores.values()]))
        results[spec] = (np.asarray(dsc), seconds)
    ref = results[REFERENCE][0] if REFERENCE in results else None
    print(f"\n{len(volumes)} cases ({args.cases} held-out phantoms + the real CT), mean DSC over 13 organs\n")
    print("| configuration | mean DSC phantoms | real CT | points lost vs f32 (phantoms, real) | seconds |")
    print("|---|---|---|---|---|")
    for spec, (dsc, seconds) in results.items():
        lost = "" if ref is None else (f"{100 * (ref[:-1].mean() - dsc[:-1].mean()):+.2f}, "
                                        f"{100 * (ref[-1] - dsc[-1]):+.2f}")
        print(f"| {spec} | {dsc[:-1].mean():.4f} | {dsc[-1]:.4f} | {lost} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
