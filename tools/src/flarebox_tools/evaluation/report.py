"""Scores and the report: per-case rows, cases.csv and summary.md.

Scores are `flarebox_tools.metrics.score_files` on each prediction and its reference, with the organisers'
rules (Task 1: binary lesion; Tasks 2 and 3: the 13 organs). A case that failed (the container
exited non-zero, timed out, wrote no output, or wrote one that cannot be scored, e.g. on another
voxel grid) scores 0 in every class, as a missing submission does in the ranking, and is listed
with its reason; the per-class statistics include those zeros and say how many there were.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flarebox.errors import CaseError
from flarebox_tools.metrics import ORGAN_NAMES, score_files


@dataclass(frozen=True)
class Limits:
    """A task's limits per case; None where FLARE states none."""

    time_s: float | None
    gpu_mb: float | None
    ram_mb: float | None
    source: str


# FLARE.md: Task 1 45 s and 4 GB VRAM; Task 3 15 s and 4 GB; Task 2 CPU only, likely 8 GB RAM and no
# published time limit (its published entry took 26 s per case on a 12-core CPU).
TASK_LIMITS = {
    "task1": Limits(45.0, 4096.0, None, "FLARE 2024 Task 1: 45 s and 4 GB GPU memory per case"),
    "task2": Limits(None, None, 8192.0, "FLARE 2024 Task 2: CPU only, 8 GB RAM (the container's -m 8G); "
                                        "no published time limit"),
    "task3": Limits(15.0, 4096.0, None, "FLARE 2024 Task 3: 15 s and 4 GB GPU memory per case"),
}


def task_key(task: str) -> str:
    key = task.split("_", 1)[0]
    if key not in TASK_LIMITS:
        raise ValueError(f"task {task!r}: expected a folder name starting with task1, task2 or task3")
    return key


def metric_task(task: str) -> str:
    """flarebox_tools.metrics' rule set: Task 1 is binary lesion segmentation, Tasks 2 and 3 are organs."""
    return "lesion" if task_key(task) == "task1" else "organs"


def class_names(task: str) -> tuple[str, ...]:
    return ("lesion",) if metric_task(task) == "lesion" else ORGAN_NAMES


@dataclass
class CaseRow:
    """One line of cases.csv."""

    case_id: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    failure: str = ""
    seconds: float | None = None
    gpu_peak_mb: float | None = None
    gpu_area_mb_s: float | None = None
    ram_peak_mb: float | None = None
    cpu_mean_pct: float | None = None
    over_limit: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape_zyx))

    def mean(self, metric: str) -> float:
        values = [s[metric] for s in self.scores.values() if not math.isnan(s[metric])]
        return float(np.mean(values)) if values else float("nan")


def image_grid(path: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape_zyx, spacing_zyx_mm) from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    x, y, z = reader.GetSize()
    sx, sy, sz = reader.GetSpacing()
    return (z, y, x), (sz, sy, sx)


def score(row: CaseRow, prediction: Path | None, reference: Path, task: str) -> None:
    """Fill the row's scores; a missing or unscorable prediction fails the case and scores 0."""
    if not row.failure and prediction is not None:
        try:
            row.scores = score_files(prediction, reference, metric_task(task))
            return
        except (CaseError, ValueError, RuntimeError, OSError) as exc:  # e.g. a truncated output file
            row.failure = f"cannot score {prediction.name}: {str(exc).splitlines()[0][:200]}"
    if not row.failure:
        row.failure = "no prediction"
    row.scores = {name: {"dsc": 0.0, "nsd": 0.0} for name in class_names(task)}


def flag_limits(row: CaseRow, limits: Limits) -> None:
    checks = [("time", row.seconds, limits.time_s, "s"), ("GPU", row.gpu_peak_mb, limits.gpu_mb, "MB"),
              ("RAM", row.ram_peak_mb, limits.ram_mb, "MB")]
    row.over_limit = [f"{name} {value:.4g} > {limit:g} {unit}" for name, value, limit, unit in checks
                      if value is not None and limit is not None and value > limit]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def csv_columns(task: str) -> list[str]:
    names = class_names(task)
    return (["case", "status", "shape_zyx", "voxels", "spacing_zyx_mm", "seconds", "over_limit", "gpu_peak_mb",
             "gpu_area_mb_s", "ram_peak_mb", "cpu_mean_pct", "dsc_mean", "nsd_mean"]
            + [f"dsc_{n}" for n in names] + [f"nsd_{n}" for n in names] + ["notes"])


def write_csv(rows: Sequence[CaseRow], task: str, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns(task))
        for r in rows:
            writer.writerow(
                [r.case_id, f"failed: {r.failure}" if r.failure else "ok", "x".join(map(str, r.shape_zyx)), r.voxels,
                 "x".join(f"{s:.3g}" for s in r.spacing_zyx_mm), _fmt(r.seconds, 2), "; ".join(r.over_limit),
                 _fmt(r.gpu_peak_mb, 0), _fmt(r.gpu_area_mb_s, 0), _fmt(r.ram_peak_mb, 0), _fmt(r.cpu_mean_pct, 0),
                 _fmt(r.mean("dsc"), 4), _fmt(r.mean("nsd"), 4)]
                + [_fmt(r.scores[n]["dsc"], 4) for n in class_names(task)]
                + [_fmt(r.scores[n]["nsd"], 4) for n in class_names(task)] + ["; ".join(r.notes)])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def class_statistics(rows: Sequence[CaseRow], task: str) -> list[tuple[str, dict[str, tuple[float, float, float]]]]:
    """Per class and metric: (mean, population sd, median) over every case, failures included as 0;
    NaN (an organ on one slice, where the organisers' rule leaves nothing to score) is left out."""
    stats = []
    for name in class_names(task):
        per_metric = {}
        for metric in ("dsc", "nsd"):
            values = np.array([r.scores[name][metric] for r in rows], float)
            values = values[~np.isnan(values)]
            per_metric[metric] = ((float(values.mean()), float(values.std()), float(np.median(values)))
                                  if values.size else (math.nan, math.nan, math.nan))
        stats.append((name, per_metric))
    return stats


def write_summary(rows: Sequence[CaseRow], task: str, limits: Limits, path: Path, *, how: str,
                  sampling: Sequence[str], figures: Sequence[str], figures_note: str = "") -> None:
    """summary.md: which path ran, per-class scores, time and memory per case against the limits."""
    failed = [r for r in rows if r.failure]
    over = [r for r in rows if r.over_limit]
    lines = [f"# Evaluation: {task}", "", f"- **Path**: {how}", f"- **Cases**: {len(rows)}, failed: {len(failed)}, "
             f"over a limit: {len(over)}", f"- **Limits**: {limits.source}",
             f"- **Metrics**: flarebox_tools.metrics ({metric_task(task)} rules); "
             "a failed case scores 0 in every class",
             *[f"- {line}" for line in sampling], ""]
    if failed:
        lines += ["## Failed cases", "", *[f"- `{r.case_id}`: {r.failure}" for r in failed], ""]
    lines += ["## Scores per class", "", "mean ± sd (population) and median over all cases.", "",
              "| class | DSC mean ± sd | DSC median | NSD mean ± sd | NSD median |", "|---|---|---|---|---|"]
    for name, m in class_statistics(rows, task):
        (dm, ds, dmed), (nm, ns, nmed) = m["dsc"], m["nsd"]
        lines.append(f"| {name} | {dm:.3f} ± {ds:.3f} | {dmed:.3f} | {nm:.3f} ± {ns:.3f} | {nmed:.3f} |")
    means = np.array([[r.mean("dsc"), r.mean("nsd")] for r in rows], float)
    lines += [f"| **all classes (case means)** | {np.nanmean(means[:, 0]):.3f} ± {np.nanstd(means[:, 0]):.3f} | "
              f"{np.nanmedian(means[:, 0]):.3f} | {np.nanmean(means[:, 1]):.3f} ± {np.nanstd(means[:, 1]):.3f} | "
              f"{np.nanmedian(means[:, 1]):.3f} |", ""]
    timed = [r for r in rows if r.seconds is not None]
    if timed:
        def limit(value: float | None, unit: str) -> str:
            return f" (limit {value:g} {unit})" if value is not None else ""

        lines += ["## Time and memory per case", "",
                  f"| case | voxels (z×y×x) | seconds{limit(limits.time_s, 's')} | peak GPU MB"
                  f"{limit(limits.gpu_mb, 'MB')} | GPU MB·s | peak RAM MB{limit(limits.ram_mb, 'MB')} | mean CPU % | "
                  "over limit |", "|---|---|---|---|---|---|---|---|"]
        for r in timed:
            flag = "**" + "; ".join(r.over_limit) + "**" if r.over_limit else ""
            lines.append(f"| {r.case_id} | {r.voxels:,} ({'×'.join(map(str, r.shape_zyx))}) | {_fmt(r.seconds, 1)} | "
                         f"{_fmt(r.gpu_peak_mb, 0) or 'n/a'} | {_fmt(r.gpu_area_mb_s, 0) or 'n/a'} | "
                         f"{_fmt(r.ram_peak_mb, 0) or 'n/a'} | {_fmt(r.cpu_mean_pct, 0) or 'n/a'} | {flag} |")
        seconds = np.array([r.seconds for r in timed])
        lines += ["", f"Time per case: mean {seconds.mean():.1f} s, median {np.median(seconds):.1f} s, "
                  f"max {seconds.max():.1f} s.", ""]
    noted = [r for r in rows if r.notes]
    if noted:
        lines += ["## Notes", "", *[f"- `{r.case_id}`: {'; '.join(r.notes)}" for r in noted], ""]
    lines += ["## Figures", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in figures] or [figures_note or "none"]
    if figures and figures_note:
        lines.append(figures_note)
    path.write_text("\n".join(lines) + "\n")
