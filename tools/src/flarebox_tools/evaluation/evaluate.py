"""The whole evaluation: choose the path, run every case, score, write the report.

In: a task folder name, a folder of `<case>_0000.nii.gz` images and one of `<case>.nii.gz` references
(or an existing folder of `<case>.nii.gz` predictions to score only); out: REPORT/cases.csv,
REPORT/summary.md and PNG figures, and the rows, for callers that check them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flarebox import io
from flarebox_tools.evaluation import figures as figs
from flarebox_tools.evaluation import run
from flarebox_tools.evaluation.monitor import gpu_available
from flarebox_tools.evaluation.report import (
    TASK_LIMITS,
    CaseRow,
    Limits,
    flag_limits,
    image_grid,
    score,
    task_key,
    write_csv,
    write_summary,
)

PATHS = ("auto", "docker", "local")


class HarnessError(Exception):
    """The evaluation cannot start: names the folder or file and the reason."""


@dataclass(frozen=True)
class Choice:
    """Which way the cases run, and why: "docker", "local" or "predictions" (score only)."""

    path: str
    description: str


def choose_path(requested: str, image: str, task_dir: Path) -> Choice:
    """Docker where an engine is reachable and the image is built; the local predict path otherwise."""
    if requested not in PATHS:
        raise HarnessError(f"path {requested!r}: expected one of {PATHS}")
    local = Choice("local", f"local predict path: `sh {task_dir.name}/predict.sh` with INPUT_DIR/OUTPUT_DIR, "
                            "one case per run, no container")
    if requested == "local":
        return dataclasses.replace(local, description=local.description + " (asked for)")
    engine = run.docker_engine_reachable()
    built = engine and run.docker_image_exists(image)
    if built:
        command = shlex.join(run.docker_command(image, Path("IN"), Path("OUT"), memory=run.memory_limit(task_dir.name),
                                              container_name="NAME", gpu=run.wants_gpu(task_dir.name)))
        return Choice("docker", f"Docker, image `{image}`, per case: `{command}`")
    why = ("no Docker engine reachable" if not engine
           else f"image {image} is not built (make build TASK={task_dir.name})")
    if requested == "docker":
        raise HarnessError(f"{image}: cannot run through Docker: {why}")
    return dataclasses.replace(local, description=f"{local.description}, because {why}")


def _failure_lines(log_tail: str, image_name: str) -> str:
    """The engine's lines about this case (its one-line reason names the file), else the log's last
    three lines; at most 300 characters."""
    lines = log_tail.strip().splitlines()
    return " | ".join([line for line in lines if image_name in line] or lines[-3:])[-300:]


def _cases(images: Path | None, labels: Path, predictions: Path | None) -> list[tuple[str, Path | None, Path]]:
    """(case id, image or None, reference) per case, sorted; a case without a reference stops the run."""
    if not labels.is_dir():
        raise HarnessError(f"{labels}: no such folder of reference labels")
    if predictions is not None:
        ids = sorted(p.name[: -len(".nii.gz")] for p in labels.glob("*.nii.gz"))
        image_of = {i: images / f"{i}{io.INPUT_SUFFIX}" for i in ids} if images is not None else {}
        cases = [(i, image_of[i] if i in image_of and image_of[i].is_file() else None, labels / f"{i}.nii.gz")
                 for i in ids]
    else:
        if images is None or not images.is_dir():
            raise HarnessError(f"{images}: no such folder of input images")
        found, rejected = io.discover(images)
        if rejected:
            raise HarnessError(str(rejected[0]))
        cases = [(c.case_id, c.path, labels / f"{c.case_id}.nii.gz") for c in found]
    for case_id, _, reference in cases:
        if not reference.is_file():
            raise HarnessError(f"{reference}: no reference labels for case {case_id}")
    if not cases:
        raise HarnessError(f"{labels if predictions is not None else images}: no cases found")
    return cases


def evaluate(task: str, images: Path | None, labels: Path, report: Path, *, predictions: Path | None = None,
             path: str = "auto", image: str | None = None, limits: Limits | None = None, timeout_s: float = 3600.0,
             work_dir: Path | None = None, container_name: str = "flarebox-harness",
             venv_bin: Path | None = None, on_case: Callable[[CaseRow], None] | None = None
             ) -> tuple[list[CaseRow], Choice]:
    """Run (or, with `predictions`, only score) every case and write the report into `report`.

    timeout_s: a case still running then is killed and failed (the organisers scored a hung container
    3600 s). work_dir: where the per-case folders and the predictions go (a temporary folder if None;
    predictions are then removed with it). limits: override the task's limits (e.g. a tighter time)."""
    task_dir = run.ROOT / task
    task_key(task)
    if predictions is None and not (task_dir / "predict.sh").is_file():
        raise HarnessError(f"{task_dir}: no predict.sh: not a task folder")
    limits = limits or TASK_LIMITS[task_key(task)]
    images = Path(images) if images is not None else None
    cases = _cases(images, Path(labels), Path(predictions) if predictions is not None else None)
    if predictions is not None:
        if not Path(predictions).is_dir():
            raise HarnessError(f"{predictions}: no such folder of predictions")
        choice = Choice("predictions", f"scoring only: existing predictions in `{predictions}` (nothing was run)")
    else:
        choice = choose_path(path, image or run.image_name(task), task_dir)
    report = Path(report)
    report.mkdir(parents=True, exist_ok=True)
    owned_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="flarebox-harness-")) if owned_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows, overlays = [], {}
        for case_id, case_image, reference in cases:
            row = _row(case_id, case_image, reference)
            if choice.path == "predictions":
                prediction = Path(predictions) / f"{case_id}.nii.gz"
                prediction = prediction if prediction.is_file() else None
            else:
                if choice.path == "docker":
                    result = run.run_docker_case(case_id, case_image, image=image or run.image_name(task), task=task,
                                                 work=work / "cases", predictions=work / "predictions",
                                                 container_name=container_name, timeout_s=timeout_s)
                else:
                    result = run.run_local_case(case_id, case_image, task_dir=task_dir, work=work / "cases",
                                                predictions=work / "predictions", timeout_s=timeout_s,
                                                venv_bin=venv_bin)
                row.failure, row.seconds = result.failure, result.seconds
                row.notes += result.notes
                row.gpu_peak_mb, row.gpu_area_mb_s = result.gpu_peak_mb, result.gpu_area_mb_s
                row.ram_peak_mb, row.cpu_mean_pct = result.host.peak_ram_mb, result.host.mean_cpu_pct
                if row.failure:
                    row.notes.append("log tail: " + _failure_lines(result.log_tail, case_image.name))
                prediction = result.prediction
            score(row, prediction, reference, task)
            flag_limits(row, limits)
            overlays[case_id] = (case_image, None if row.failure else prediction, reference)
            rows.append(row)
            if on_case is not None:
                on_case(row)
        write_csv(rows, task, report / "cases.csv")
        written, note = _figures(rows, task, limits, report, overlays)
        write_summary(rows, task, limits, report / "summary.md", how=choice.description,
                      sampling=_sampling_lines(choice), figures=written, figures_note=note)
        return rows, choice
    finally:
        if owned_work:
            shutil.rmtree(work, ignore_errors=True)


def _row(case_id: str, case_image: Path | None, reference: Path) -> CaseRow:
    """A case's row with its grid from the image header, or from the reference's where the image's is
    unreadable (a broken input is the container's to reject, and the report's to show)."""
    note = []
    try:
        shape_zyx, spacing_zyx_mm = image_grid(case_image or reference)
    except RuntimeError:
        note = [f"{case_image.name}: header unreadable, size from the reference"]
        try:
            shape_zyx, spacing_zyx_mm = image_grid(reference)
        except RuntimeError as exc:
            raise HarnessError(f"{reference}: cannot read the reference labels") from exc
    return CaseRow(case_id, shape_zyx, spacing_zyx_mm, notes=note)


def _sampling_lines(choice: Choice) -> list[str]:
    if choice.path == "predictions":
        return ["**Time and memory**: not measured (scoring only)"]
    gpu = ("every 0.1 s, whole device (total − free) via NVML, or nvidia-smi where pynvml is missing; "
           "peak and area (sum × 0.1 s)") if gpu_available() else "no GPU on this machine: GPU columns are empty"
    host = ("the container's cgroup every 0.1 s: RAM = usage − inactive file cache (as `docker stats`), CPU = "
            "the cgroup's CPU-time counter over the wall time" if choice.path == "docker" else
            "the process tree's summed RSS every 0.1 s; CPU = the kernel's rusage of the finished process and its "
            "children (user + system) over the wall time")
    return ["**Time**: wall clock around the whole command per case (start, imports, model loading included)",
            f"**GPU memory**: {gpu}", f"**RAM and CPU**: {host}; CPU % is of one core (200 % = two cores busy), "
            f"on a machine with {os.cpu_count()} CPU threads"]


def _figures(rows: list[CaseRow], task: str, limits: Limits, report: Path,
             overlays: dict[str, tuple[Path | None, Path | None, Path]]) -> tuple[list[str], str]:
    if not figs.matplotlib_available():
        return [], ("No figures: matplotlib is not installed in this environment (flarebox-tools pins it: "
                    "`pip install -c common/constraints.txt -e common -e tools`).")
    written = [figs.dsc_boxplot(rows, task, report / "dsc_per_class.png")]
    if any(r.seconds is not None for r in rows):
        written.append(figs.time_vs_size(rows, task, limits, report / "time_vs_size.png"))
    chosen = [(title, row, *overlays[row.case_id]) for title, row in figs.best_and_worst(rows)]
    if chosen:
        written.append(figs.overlay(chosen, report / "overlay_best_worst.png"))
    return [p.name for p in written], ""
