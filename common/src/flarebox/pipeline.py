"""The data path for one model: read -> preprocess -> infer -> export -> write, timed per stage.

`Predictor.from_config` builds everything a case needs (plan, compiled network) once, in one call;
`run_folder` applies it to a FLARE input folder, one case at a time, so one bad case never stops
the others and every failure is one line naming the file and the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flarebox import io
from flarebox.backends import load_backend
from flarebox.config import TaskConfig
from flarebox.errors import CaseError, ConfigError
from flarebox.export import to_original_grid
from flarebox.models import ModelPlan, load_plan
from flarebox.preprocess import preprocess
from flarebox.sliding_window import Backend, count_tiles, predict_logits

log = logging.getLogger("flarebox")


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    @property
    def total(self) -> float:
        return sum(self.stages.values())

    def line(self) -> str:
        parts = " ".join(f"{k} {v:.2f}s" for k, v in self.stages.items())
        return f"{parts} | total {self.total:.2f}s"


class _Stage:
    def __init__(self, timings: Timings, name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings.stages[self.name] = self.timings.stages.get(self.name, 0.0) + time.perf_counter() - self.start


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """A model ready to segment volumes: plan + compiled backend + settings."""

    def __init__(self, plan: ModelPlan, backend: Backend, config: TaskConfig) -> None:
        self.plan, self.backend, self.config = plan, backend, config

    @classmethod
    def from_config(cls, config: TaskConfig) -> Predictor:
        plan = load_plan(config.model.folder, config.model.configuration)
        if plan.input_features != config.preprocess.features:
            raise ConfigError(f"[preprocess] features: {config.preprocess.features!r}, but {plan.folder} was "
                              f"trained on {plan.input_features!r} input")
        inf = config.inference
        backend = load_backend(
            plan,
            backend=inf.backend,
            device=resolve_device(inf.device),
            precision=inf.precision,
            folds=config.model.folds,
            checkpoint=config.model.checkpoint,
            threads=inf.threads,
            cache_dir=inf.cache_dir,
        )
        return cls(plan, backend, config)

    def segment(
        self, volume: io.Volume, timings: Timings | None = None, on_tile: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """uint8 labels of one volume, on its own grid."""
        timings = timings if timings is not None else Timings()
        cfg = self.config
        with timings.stage("preprocess"):
            pre = preprocess(
                volume.array_zyx,
                volume.geometry.spacing_zyx_mm,
                self.plan,
                use_forced_spacing=cfg.preprocess.forced_spacing,
                resampler=cfg.preprocess.resampler,
                device=resolve_device(cfg.inference.device),
            )
        with timings.stage("infer"):
            logits = predict_logits(
                pre.data,
                self.backend,
                step_size=cfg.inference.step_size,
                mirroring=cfg.inference.mirroring,
                on_tile=on_tile,
            )
        with timings.stage("export"):
            return to_original_grid(logits, pre, mode=cfg.export.mode, resampler=cfg.preprocess.resampler)

    def tiles_for(self, volume: io.Volume) -> int:
        spacing = volume.geometry.spacing_zyx_mm
        shape = [int(round(n * s / t)) for n, s, t in zip(volume.array_zyx.shape, spacing, self.plan.spacing_zyx_mm,
                                                          strict=True)]
        return count_tiles(tuple(shape), self.plan.patch_zyx, self.config.inference.step_size)

    def predict_case(self, case: io.Case, output_dir: Path) -> Timings:
        timings = Timings()
        with timings.stage("read"):
            volume = io.read_case(case)
        labels = self.segment(volume, timings)
        with timings.stage("write"):
            io.write_labels(output_dir / f"{case.case_id}.nii.gz", labels, volume.geometry,
                            self.config.export.compression_level)
        return timings


def run_folder(predictor: Predictor, input_dir: Path, output_dir: Path) -> int:
    """Segment every case of a FLARE input folder; returns the number of failed inputs."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    cases, rejected = io.discover(input_dir)
    for error in rejected:
        log.error("%s: %s", Path(str(error.path)).name, error.reason)
    output_dir.mkdir(parents=True, exist_ok=True)
    failures = len(rejected)
    start = time.perf_counter()
    for index, case in enumerate(cases, start=1):
        try:
            timings = predictor.predict_case(case, output_dir)
        except CaseError as error:
            failures += 1
            log.error("%s: %s", case.path.name, error.reason)
            continue
        except Exception as error:  # one broken case must not stop the others
            failures += 1
            log.error("%s: failed: %s: %s", case.path.name, type(error).__name__, error)
            continue
        log.info("[%d/%d] %s: %s", index, len(cases), case.case_id, timings.line())
    log.info("%d case(s) written, %d failed, %.1fs in all", len(cases) - (failures - len(rejected)), failures,
             time.perf_counter() - start)
    return failures
