"""The memory budget's estimate against measured peaks: for each task's configuration and a range
of cases (CT and MRI grids, thin and thick slices, short and long), one fresh process per case builds
the predictor, segments one warm-up case, then resets its peak resident memory and segments the case.
Printed per case: the header's estimate (memory.estimate: read + work), the measured rise of the
peak over the resident memory before the case, and their ratio (must be >= 1: the estimate bounds
the peak; the smaller above 1, the fewer cases a tight limit refuses for nothing).

    make bench-memory
    python -m flarebox_tools.bench.memory --tasks task2_cpu_organs --cases ct_512x300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from flarebox_tools.paths import REPO as ROOT
from flarebox_tools.synthetic import write_image

TASKS = ("task2_cpu_organs", "task1_pancancer", "task3_mri_transfer")
# name -> (shape zyx, spacing xyz mm, voxel type, kind)
CASES = {
    "small_64": ((64, 64, 64), (1.5, 1.5, 1.5), np.int16, "ct"),
    "ct_512x120": ((120, 512, 512), (0.8, 0.8, 2.5), np.int16, "ct"),
    "ct_512x300": ((300, 512, 512), (0.8, 0.8, 2.5), np.int16, "ct"),
    "ct_thin_512x500": ((500, 512, 512), (0.7, 0.7, 0.625), np.int16, "ct"),
    "mri_320x72_f32": ((72, 320, 320), (1.2, 1.2, 6.0), np.float32, "mri"),
}

CHILD = r"""
import json, sys, time
from pathlib import Path
from flarebox.config import load_config
from flarebox.memory import Budget, resident_bytes
from flarebox.pipeline import Predictor, run_folder

config_path, warm_dir, case_dir, out_dir = sys.argv[1:5]
config = load_config(config_path)
predictor = Predictor.from_config(config)
budget = Budget.from_config(config)
run_folder(predictor, Path(warm_dir), Path(out_dir) / "warm", budget=budget)
case = next(Path(case_dir).iterdir())
need = budget.need(case)
before = resident_bytes()
Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak (VmHWM) starts again from now
start = time.perf_counter()
failures = run_folder(predictor, Path(case_dir), Path(out_dir) / "case", budget=budget)
seconds = time.perf_counter() - start
status = Path("/proc/self/status").read_text()
peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"read": need.read, "work": need.work, "before": before, "peak": peak, "failures": failures,
                  "seconds": seconds}))
"""


def make_case(folder: Path, name: str) -> Path:
    shape, spacing, dtype, kind = CASES[name]
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[-1:1:shape[0] * 1j, -1:1:shape[1] * 1j, -1:1:shape[2] * 1j]
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    if kind == "ct":
        image = np.broadcast_to(np.where(body, 40, -1000), shape).astype(np.int16)
        image += rng.integers(-20, 20, shape, dtype=np.int16)
        image[((x - 0.3) ** 2 + y**2 + z**2 < 0.1) & body] = 150
    else:
        image = np.broadcast_to(np.where(body, 300.0, 0.0), shape).astype(np.float32)
        image += rng.normal(0, 20, shape).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    return write_image(folder / f"{name}_0000.nii.gz", image.astype(dtype), spacing_xyz=spacing)


def measure(task_config: Path, warm: Path, cases: Path, out: Path) -> dict:
    """One fresh process: the predictor, a warm-up case, then the one case of `cases` with its peak
    resident memory measured from just before it. Returns need (read, work), before, peak, seconds."""
    run = subprocess.run([sys.executable, "-c", CHILD, str(task_config), str(warm), str(cases), str(out)],
                         capture_output=True, text=True, check=False, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    print("| task | case | estimate: read + work (GB) | measured peak rise (GB) | estimate / measured | s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_case(tmp / "warm", "small_64")
        for name in args.cases:
            make_case(tmp / "cases" / name, name)
        for task in args.tasks:
            for name in args.cases:
                try:
                    r = measure(ROOT / task / "config.toml", tmp / "warm", tmp / "cases" / name,
                                tmp / "out" / task / name)
                except RuntimeError as error:
                    print(f"| {task} | {name} | failed: {error} |")
                    continue
                rise = r["peak"] - r["before"]
                print(f"| {task} | {name} | {r['read'] / 2**30:.2f} + {r['work'] / 2**30:.2f} | {rise / 2**30:.2f} | "
                      f"{(r['read'] + r['work']) / max(rise, 1):.2f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
