"""GPU benchmark for tasks 1 and 3 (torch, fp16 on CUDA): time per case, peak GPU memory, and where
logits were summed, for the published networks (random weights) on synthetic CTs of growing size.

    python -m flarebox_tools.bench.gpu                       # Task 1 ResEnc at 100..1000 slices, Task 3 PlainConvUNet
    python -m flarebox_tools.bench.gpu --budget-gb 3.5 --slices 300 1000

Each case runs through `Predictor.segment` as a container runs it; the figures are what the CLI's
progress line prints. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def run(task: str, preset: str, slices: list[int], in_plane: int, spacing_xyz: tuple[float, float, float],
        budget_gb: float, workdir: Path) -> list[dict]:
    import torch

    from flarebox import io
    from flarebox.config import from_dict
    from flarebox.pipeline import Predictor, Timings
    from flarebox_tools import nnunet_folders
    from flarebox_tools.synthetic import ct_like, write_image

    model = nnunet_folders.make_trained_model_folder(workdir / preset, **getattr(nnunet_folders, preset))
    config = from_dict({"model": {"folder": str(model)},
                        "inference": {"backend": "torch", "device": "cuda", "precision": "fp16",
                                      "gpu_memory_gb": budget_gb}}, workdir)
    start = time.perf_counter()
    predictor = Predictor.from_config(config)
    predictor.warmup()
    ready = time.perf_counter() - start
    rows = []
    for n in slices:
        path = write_image(workdir / f"{task}_{n}_0000.nii.gz", ct_like((n, in_plane, in_plane), seed=n),
                           spacing_xyz=spacing_xyz)
        volume = io.read_image(path)
        timings = Timings()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        tiles: list[int] = []
        labels = predictor.segment(volume, timings, on_tile=lambda done, total, seen=tiles: seen.append(total))
        seconds = time.perf_counter() - begin
        backend = predictor.backend
        padded = [max(s, p) for s, p in zip(
            [round(a * b / c) for a, b, c in zip(volume.array_zyx.shape, volume.geometry.spacing_zyx_mm,
                                                  predictor.plan.spacing_zyx_mm, strict=True)],
            predictor.plan.patch_zyx, strict=True)]
        rows.append({"task": task, "slices": n, "shape": volume.array_zyx.shape, "tiles": tiles[-1],
                     "seconds": seconds, "stages": timings.line(), "gpu_peak_gb": backend.peak_bytes() / 2**30,
                     "tile_peak_gb": backend.tile_peak_bytes() / 2**30,
                     "place": backend.accumulation_place(tuple(padded), int(budget_gb * 2**30)),
                     "nvidia_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
                     "labels": np.unique(labels).tolist(), "ready_s": ready})
        print(rows[-1], flush=True)
        torch.cuda.reset_peak_memory_stats()
        path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gb", type=float, default=3.5)
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300, 600, 1000])
    parser.add_argument("--task3-slices", type=int, nargs="+", default=[40, 100])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = run("task1", "FLARE_TASK1_RESENC", args.slices, 512, (0.8, 0.8, 1.0), args.budget_gb, workdir)
        rows += run("task3", "FLARE_TASK3_PLAIN", args.task3_slices, 320, (1.2, 1.2, 6.0), args.budget_gb, workdir)
    print("\n| task | slices | input zyx | tiles | seconds | peak GPU GB (torch) | logits summed on |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['slices']} | {'x'.join(map(str, r['shape']))} | {r['tiles']} | {r['seconds']:.1f} | "
              f"{r['gpu_peak_gb']:.2f} | {r['place']} |")


if __name__ == "__main__":
    main()
