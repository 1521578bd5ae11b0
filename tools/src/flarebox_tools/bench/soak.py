"""Soak: many consecutive organiser-style runs of one image, one case a run, over a rotation of good
and bad cases; half the runs as root, half as a non-root --user. Each run is `docker container run
--network none -m MEM ... sh predict.sh` through the evaluation harness (flarebox_tools.evaluation.run), which
samples the container's cgroup memory.

A case is lost when a good case has no output, or a bad case does anything but exit 1 with one line
naming its file and no output. Time and peak memory of the good cases are compared between the
first and the last runs of each case: no growth means the last runs are within the noise of the first.

    make soak TASK=task2_cpu_organs RUNS=100
    python -m flarebox_tools.bench.soak --task task1_pancancer --runs 20
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flarebox_tools.evaluation.run import image_name, memory_limit, run_docker_case
from flarebox_tools.paths import REPO as ROOT
from flarebox_tools.synthetic import ct_like, oblique, write_image


@dataclass(frozen=True)
class SoakCase:
    path: Path
    good: bool
    expect: str = ""  # for a bad case: what its one line must say


def make_cases(folder: Path) -> list[SoakCase]:
    """Three good cases (the bundled real CT, an oblique CT, an MRI-like float grid) and four bad
    ones (corrupt gzip, truncated stream, NaN voxels, a 4D file)."""
    import nibabel

    folder.mkdir(parents=True, exist_ok=True)
    real = folder / "real_0000.nii.gz"
    shutil.copy(ROOT / "tests" / "data" / "inputs" / "ts_ct_sm_0000.nii.gz", real)
    oblique_ct = write_image(folder / "oblique_0000.nii.gz", ct_like((40, 120, 110), seed=3), spacing_xyz=(1.2, 1.1, 3),
                             direction=oblique())
    floats = write_image(folder / "floats_0000.nii.gz", ct_like((30, 96, 96), seed=4).astype(np.float32),
                         spacing_xyz=(1.5, 1.5, 4))
    corrupt = folder / "corrupt_0000.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"not really gzip" * 50)
    truncated = folder / "truncated_0000.nii.gz"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    nan = ct_like((20, 48, 40)).astype(np.float32)
    nan[5, 5, 5] = np.nan
    nan_case = write_image(folder / "nan_0000.nii.gz", nan, spacing_xyz=(2, 2, 3))
    four_d = folder / "fourd_0000.nii.gz"
    with gzip.open(four_d, "wb") as fh:
        fh.write(nibabel.Nifti1Image(np.zeros((20, 20, 10, 3), np.int16), np.eye(4)).to_bytes())
    return [SoakCase(real, True), SoakCase(corrupt, False, "cannot read"), SoakCase(oblique_ct, True),
            SoakCase(truncated, False, "cannot read"), SoakCase(floats, True), SoakCase(nan_case, False, "NaN"),
            SoakCase(four_d, False, "expected a 3D volume")]


def verdict(case: SoakCase, result) -> str:
    """'' when the run did what it must, else why the case is lost."""
    name = case.path.name
    if case.good:
        return result.failure
    lines = [line for line in result.log_tail.splitlines() if name in line]
    if result.returncode != 1 or result.prediction is not None:
        return f"bad case: exit {result.returncode}, output {'written' if result.prediction else 'none'}"
    if len(lines) != 1 or case.expect not in lines[0] or "Traceback" in result.log_tail:
        return f"bad case: expected one line with {case.expect!r}, got {lines[:3]}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="task2_cpu_organs")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--image", help="default: the image `make build TASK=...` tags")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    image = args.image or image_name(args.task)
    rows: list[tuple[int, SoakCase, str, object, str]] = []
    print(f"soak: {args.runs} runs of {image}, -m {memory_limit(args.task)}, --network none, "
          "one case a run, odd runs as --user 1000:1000")
    print("| run | case | user | exit | s | peak RAM MB | lost |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = make_cases(tmp / "cases")
        for run in range(args.runs):
            case = cases[run % len(cases)]
            user = "1000:1000" if run % 2 else None
            case_id = case.path.name.removesuffix("_0000.nii.gz")
            result = run_docker_case(case_id, case.path, image=image, task=args.task, work=tmp / "work",
                                     predictions=tmp / "predictions" / str(run), container_name=f"flarebox-soak-{run}",
                                     timeout_s=args.timeout, user=user)
            lost = verdict(case, result)
            rows.append((run, case, user or "root", result, lost))
            print(f"| {run + 1} | {case_id} | {user or 'root'} | {result.returncode} | {result.seconds:.1f} | "
                  f"{result.host.peak_ram_mb or 0:.0f} | {lost} |", flush=True)
    summarise(rows, len(cases))


def summarise(rows, n_cases: int) -> None:
    lost = [r for r in rows if r[4]]
    print(f"\nruns: {len(rows)}; good cases: {sum(r[1].good for r in rows)}; bad cases: "
          f"{sum(not r[1].good for r in rows)}; lost: {len(lost)}")
    print("\n| case | runs | s, first third | s, last third | peak RAM MB, first third | peak RAM MB, last third |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r[1].path.name for r in rows):
        mine = [r for r in rows if r[1].path.name == name]
        third = max(len(mine) // 3, 1)
        first, last = mine[:third], mine[-third:]

        def med(part, key):
            values = [key(r[3]) for r in part if key(r[3]) is not None]
            return f"{statistics.median(values):.1f}" if values else "-"

        print(f"| {name.removesuffix('_0000.nii.gz')} | {len(mine)} | {med(first, lambda r: r.seconds)} | "
              f"{med(last, lambda r: r.seconds)} | {med(first, lambda r: r.host.peak_ram_mb)} | "
              f"{med(last, lambda r: r.host.peak_ram_mb)} |")


if __name__ == "__main__":
    main()
