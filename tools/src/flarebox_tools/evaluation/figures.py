"""PNG figures of a report, with matplotlib (Agg, no display): per-class DSC box plot, time against
image size, and prediction vs reference on mid slices for the best and the worst case.

Figures are small on purpose (about 100 dpi): they go into the repository's docs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flarebox_tools.evaluation.report import CaseRow, Limits, class_names


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dsc_boxplot(rows: Sequence[CaseRow], task: str, path: Path) -> Path:
    plt = _pyplot()
    names = class_names(task)
    data = [[r.scores[n]["dsc"] for r in rows if not np.isnan(r.scores[n]["dsc"])] for n in names]
    fig, ax = plt.subplots(figsize=(max(3.0, 0.55 * len(names) + 1.5), 3.4), dpi=100)
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), [n.replace("_", " ") for n in names], rotation=45, ha="right",
                  fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("DSC")
    ax.set_title(f"{task}: DSC per class ({len(rows)} cases; triangle = mean)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def time_vs_size(rows: Sequence[CaseRow], task: str, limits: Limits, path: Path) -> Path:
    plt = _pyplot()
    timed = [r for r in rows if r.seconds is not None]
    fig, ax = plt.subplots(figsize=(4.6, 3.2), dpi=100)
    for failed, marker, label in ((False, "o", "ok"), (True, "x", "failed")):
        points = [(r.voxels / 1e6, r.seconds) for r in timed if bool(r.failure) == failed]
        if points:
            x, y = zip(*points, strict=True)
            ax.scatter(x, y, marker=marker, label=label, color="C3" if failed else "C0")
    if limits.time_s is not None:
        ax.axhline(limits.time_s, color="C3", linestyle="--", linewidth=1, label=f"limit {limits.time_s:.0f} s")
    ax.set_xlabel("image size (million voxels)")
    ax.set_ylabel("wall-clock seconds per case")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.set_title(f"{task}: time against image size", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _mid_slices(labels_zyx: np.ndarray) -> tuple[int, int]:
    """Axial and coronal index through the middle of the labelled extent (the volume's middle if empty)."""
    nonzero = np.argwhere(labels_zyx > 0)
    if nonzero.size == 0:
        return labels_zyx.shape[0] // 2, labels_zyx.shape[1] // 2
    middle = (nonzero.min(0) + nonzero.max(0)) // 2
    return int(middle[0]), int(middle[1])


def _image_or_black(image_path: Path | None, shape_zyx: tuple[int, ...]) -> np.ndarray:
    """The case's image, or black where there is none (scoring only) or it is unreadable (a broken
    case: its reference is still worth showing)."""
    from flarebox import io
    from flarebox.errors import CaseError

    if image_path is not None:
        try:
            image = io.read_image(image_path).array_zyx
            if image.shape == tuple(shape_zyx):
                return image
        except (CaseError, RuntimeError):
            pass
    return np.zeros(shape_zyx, np.float32)


def overlay(cases: Sequence[tuple[str, CaseRow, Path | None, Path | None, Path]], path: Path) -> Path:
    """Rows of (title, row, image, prediction, reference): axial and coronal mid slices, reference and
    prediction each drawn over the image; a missing prediction shows the image alone."""
    from matplotlib.colors import ListedColormap

    from flarebox import io

    plt = _pyplot()
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[:14]
    colours[0, 3] = 0.0  # background transparent
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(len(cases), 4, figsize=(9.6, 2.5 * len(cases)), dpi=90, squeeze=False)
    for (title, row, image_path, pred_path, ref_path), ax_row in zip(cases, axes, strict=True):
        ref_volume = io.read_image(ref_path)
        reference = np.rint(ref_volume.array_zyx).astype(np.int16)
        image_zyx = _image_or_black(image_path, reference.shape)
        prediction = (np.rint(io.read_image(pred_path).array_zyx).astype(np.int16) if pred_path is not None
                      else np.zeros_like(reference))
        z, y = _mid_slices(reference)
        sz, sy, sx = ref_volume.geometry.spacing_zyx_mm
        lo, hi = np.percentile(image_zyx, [1, 99])
        views = (("axial", (z,), sy / sx, "upper"), ("coronal", (slice(None), y), sz / sx, "lower"))
        for k, (view, index, aspect, origin) in enumerate(views):
            for j, (what, labels) in enumerate((("reference", reference), ("prediction", prediction))):
                ax = ax_row[2 * k + j]
                ax.imshow(image_zyx[index], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin=origin,
                          interpolation="nearest")
                ax.imshow(np.clip(labels[index], 0, 13), cmap=cmap, vmin=0, vmax=13, alpha=0.45, aspect=aspect,
                          origin=origin, interpolation="nearest")
                ax.set_title(f"{view}, {what}", fontsize=8)
                ax.axis("off")
        ax_row[0].text(-0.05, 0.5, f"{title}\n{row.case_id}\nmean DSC {row.mean('dsc'):.3f}", fontsize=8,
                       ha="right", va="center", transform=ax_row[0].transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def best_and_worst(rows: Sequence[CaseRow]) -> list[tuple[str, CaseRow]]:
    """The cases of highest and lowest mean DSC (one entry when there is one case)."""
    ranked = sorted(rows, key=lambda r: np.nan_to_num(r.mean("dsc"), nan=-1.0))
    if not ranked:
        return []
    return [("best", ranked[-1])] + ([("worst", ranked[0])] if len(ranked) > 1 else [])
