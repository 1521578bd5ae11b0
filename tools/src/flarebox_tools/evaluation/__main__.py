"""Command line: `python -m flarebox_tools.evaluation -t TASK -i IMAGES -g LABELS -r REPORT [-p PREDICTIONS]`.

    make evaluate TASK=task2_cpu_organs IN=images GT=labels REPORT=dir            # run, then score
    make evaluate TASK=task2_cpu_organs PRED=predictions GT=labels REPORT=dir     # score only

One line per case as it finishes, then where the report is. Exit status 1 when any case failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flarebox_tools.evaluation.evaluate import PATHS, HarnessError, evaluate
from flarebox_tools.evaluation.report import TASK_LIMITS, CaseRow, Limits, task_key


def _line(row: CaseRow) -> str:
    figures = []
    if row.seconds is not None:
        figures.append(f"{row.seconds:.1f} s")
    if row.ram_peak_mb is not None:
        figures.append(f"RAM {row.ram_peak_mb:.0f} MB")
    if row.gpu_peak_mb is not None:
        figures.append(f"GPU {row.gpu_peak_mb:.0f} MB")
    figures.append(f"DSC {row.mean('dsc'):.3f} NSD {row.mean('nsd'):.3f}")
    status = f"FAILED ({row.failure}) " if row.failure else ""
    over = f" OVER LIMIT: {'; '.join(row.over_limit)}" if row.over_limit else ""
    return f"{row.case_id}: {status}{', '.join(figures)}{over}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--task", required=True, help="task folder, e.g. task2_cpu_organs")
    parser.add_argument("-i", "--images", type=Path, help="folder of <case>_0000.nii.gz (optional with -p)")
    parser.add_argument("-g", "--labels", type=Path, required=True, help="folder of reference <case>.nii.gz")
    parser.add_argument("-r", "--report", type=Path, required=True, help="folder for cases.csv, summary.md, PNGs")
    parser.add_argument("-p", "--predictions", type=Path, help="score this folder of <case>.nii.gz; run nothing")
    parser.add_argument("--path", choices=PATHS, default="auto",
                        help="docker: the built image; local: predict.sh; auto: Docker when an engine and the "
                             "image are there (default)")
    parser.add_argument("--image", help="image to run (default: what `make build TASK=...` tags)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="kill and fail a case after this long")
    parser.add_argument("--time-limit-s", type=float, help="flag cases slower than this (default: the task's)")
    parser.add_argument("--gpu-limit-mb", type=float, help="flag cases above this peak GPU memory")
    parser.add_argument("--ram-limit-mb", type=float, help="flag cases above this peak RAM")
    parser.add_argument("--work-dir", type=Path, help="keep per-case folders, logs and predictions here")
    parser.add_argument("--container-name", default="flarebox-harness", help="docker --name for each case")
    args = parser.parse_args(argv)
    try:
        base = TASK_LIMITS[task_key(args.task)]
    except ValueError as exc:
        parser.error(str(exc))
    limits = Limits(args.time_limit_s if args.time_limit_s is not None else base.time_s,
                    args.gpu_limit_mb if args.gpu_limit_mb is not None else base.gpu_mb,
                    args.ram_limit_mb if args.ram_limit_mb is not None else base.ram_mb,
                    base.source if (args.time_limit_s, args.gpu_limit_mb, args.ram_limit_mb) == (None, None, None)
                    else f"{base.source}; overridden on the command line")
    try:
        rows, choice = evaluate(args.task, args.images, args.labels, args.report, predictions=args.predictions,
                                path=args.path, image=args.image, limits=limits, timeout_s=args.timeout_s,
                                work_dir=args.work_dir, container_name=args.container_name,
                                on_case=lambda row: print(_line(row), flush=True))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = sum(bool(r.failure) for r in rows)
    print(f"{len(rows)} cases, {failed} failed; path: {choice.description}\nreport: {args.report}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
