"""The data path: read -> preprocess -> infer -> export -> (postprocess) -> write, timed per stage.

`Predictor.from_config` builds everything a case needs (plan, compiled network) once, in one call;
`run_folder` applies it to a FLARE input folder, one case at a time, so one bad case never stops
the others and every failure is one line naming the file and the reason. Reading and writing,
mostly gzip, which releases the GIL, overlap the rest: the next case is read and the previous one
written in background threads while a case is segmented, and the first case is read while the
models load.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flarebox import io
from flarebox.backends import Backend, load_backend
from flarebox.config import TaskConfig, load_config
from flarebox.errors import CaseError, ConfigError
from flarebox.export import Labels, to_original_grid
from flarebox.locate import Locator, coarse_plan
from flarebox.memory import Budget, Need
from flarebox.models import ModelPlan, load_plan
from flarebox.preprocess import NNUNET_PADDING, PadValues, Preprocessed, preprocess
from flarebox.sliding_window import fitted_patch, importance_map, predict_logits

log = logging.getLogger("flarebox")
_COMPILER = ThreadPoolExecutor(1, "flarebox-compile")


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # e.g. gpu_peak, shown after the times

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    @property
    def total(self) -> float:
        return sum(self.stages.values())

    def line(self) -> str:
        parts = " ".join(f"{k} {v:.2f}s" for k, v in self.stages.items())
        notes = "".join(f" | {k} {v}" for k, v in self.notes.items())
        return f"{parts} | total {self.total:.2f}s{notes}"


class _Stage:
    def __init__(self, timings: Timings, name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings.stages[self.name] = self.timings.stages.get(self.name, 0.0) + time.perf_counter() - self.start


def resolve_device(device: str) -> str:
    """'auto': CUDA where torch sees a GPU, else the CPU, said loudly when the torch build is CUDA's
    (a GPU image run without --gpus, or with a driver too old for its CUDA)."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if torch.version.cuda is not None:
        log.warning("WARNING: no GPU found (torch %s built for CUDA %s): running on the CPU, many times slower",
                    torch.__version__, torch.version.cuda)
    return "cpu"


@dataclass(frozen=True)
class Model:
    """One model folder ready to run: its plan and its compiled backend (all its folds)."""

    plan: ModelPlan
    backend: Backend


def _same_preprocessing(first: ModelPlan, other: ModelPlan) -> None:
    """Ensembled models share one preprocessed array, so they must preprocess alike."""
    for name in ("spacing_zyx_mm", "transpose_forward", "normalizations", "use_mask_for_norm", "num_classes"):
        if getattr(first, name) != getattr(other, name):
            raise ConfigError(f"[model] ensemble: {other.folder} differs from {first.folder} in {name} "
                              f"({getattr(other, name)} vs {getattr(first, name)})")


class Predictor:
    """Models ready to segment volumes: plans + compiled backends + settings (+ an optional gate,
    + an optional locator whose box the models' tiles keep to)."""

    def __init__(self, models: list[Model], config: TaskConfig, gate: Predictor | None = None,
                 device: str = "cpu", locator: Locator | None = None) -> None:
        self.models, self.config, self.gate, self.locator = models, config, gate, locator
        self.device = device  # the one the models run on ('auto' resolved)

    @property
    def plan(self) -> ModelPlan:
        return self.models[0].plan

    @property
    def backend(self) -> Backend:
        return self.models[0].backend

    @classmethod
    def from_config(cls, config: TaskConfig) -> Predictor:
        """Everything a case needs, built once: the model (and ensemble members) and the gate's model."""
        inf = config.inference
        device = resolve_device(inf.device) if inf.backend == "torch" else inf.device.replace("auto", "cpu")
        models = []
        for index, folder in enumerate((config.model.folder, *config.model.ensemble)):
            plan = load_plan(folder, config.model.configuration)
            if plan.input_features != config.preprocess.features:
                raise ConfigError(f"[preprocess] features: {config.preprocess.features!r}, but {plan.folder} was "
                                  f"trained on {plan.input_features!r} input")
            if models:
                _same_preprocessing(models[0].plan, plan)
            backend = load_backend(plan, backend=inf.backend, device=device, precision=inf.precision,
                                   folds=config.model.folds if index == 0 else plan.folds,
                                   checkpoint=config.model.checkpoint, threads=inf.threads, cache_dir=inf.cache_dir)
            models.append(Model(plan, backend))
        gate = None
        if config.postprocess.gate_config is not None:
            gate_config = load_config(config.postprocess.gate_config)
            if gate_config.postprocess.gate_config is not None:
                raise ConfigError(f"[postprocess] gate_config: {config.postprocess.gate_config} has a gate of its own")
            gate = cls.from_config(gate_config)
        return cls(models, config, gate, device, cls._locator(config, models[0], device))

    @staticmethod
    def _locator(config: TaskConfig, organs: Model, device: str) -> Locator | None:
        """The coarse pass of `[locate]`: a locator model of its own, or the organ model coarsened."""
        settings, inf, pre = config.locate, config.inference, config.preprocess
        if settings.mode == "off":
            return None
        if settings.mode == "model":
            plan, backend = coarse_plan(organs.plan, settings.coarsen), organs.backend
        else:
            plan = load_plan(settings.folder)
            if plan.input_features != organs.plan.input_features:
                raise ConfigError(f"[locate] folder: {plan.folder} reads {plan.input_features!r} input, the organ "
                                  f"model {organs.plan.input_features!r}")
            backend = load_backend(plan, backend=inf.backend, device=device, precision=settings.precision,
                                   folds=plan.folds, threads=inf.threads, cache_dir=inf.cache_dir)
        return Locator(plan, backend, settings, resampler=pre.resampler, body_threshold=pre.body_threshold,
                       body_margin_mm=pre.body_margin_mm, step_size=max(inf.step_size, 0.75))

    def warmup(self) -> None:
        """One zero tile through every backend: compiles kernels, fills caches."""
        for model in self.models:
            tile = np.zeros((1, model.plan.num_input_channels, *model.plan.patch_zyx), np.float32)
            model.backend.predict(tile)
        if self.locator is not None and self.locator.backend is not self.backend:
            plan = self.locator.plan
            self.locator.backend.predict(np.zeros((1, plan.num_input_channels, *plan.patch_zyx), np.float32))

    def _tile_backend(self, model: Model, shape_zyx: tuple[int, ...]) -> Backend:
        """The backend for a network input of this shape: the model's own patch, or with `fit_patch`
        the patch fitted to the image (OpenVINO compiles each such shape once)."""
        if not self.config.inference.fit_patch:
            return model.backend
        plan = model.plan
        return model.backend.for_patch(fitted_patch(shape_zyx, plan.patch_zyx, plan.patch_divisor_zyx))

    def _logits(self, data: np.ndarray, model: Model, on_tile: Callable[[int, int], None] | None,
                labels: bool = False, pad_values: PadValues = NNUNET_PADDING) -> np.ndarray:
        """One model's sliding-window logits (or labels), summed on the GPU when they fit there,
        else in host memory; a GPU that runs out of memory anyway (other tenants) gets the case
        again on the host."""
        inf = self.config.inference
        backend = self._tile_backend(model, data.shape[1:])
        run = dict(step_size=inf.step_size, mirroring=inf.mirroring, on_tile=on_tile, labels=labels,
                   pad_values=pad_values)
        gpu = backend.gpu
        if gpu is None:
            return predict_logits(data, backend, **run)
        padded = tuple(max(s, p) for s, p in zip(data.shape[1:], backend.patch_zyx, strict=True))
        if gpu.accumulation_place(padded, int(inf.gpu_memory_gb * 2**30)) == "host":
            return predict_logits(data, backend, **run)
        try:
            return predict_logits(data, backend, accumulate="device", **run)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if "out of memory" not in str(error):
                raise
            log.warning("GPU out of memory summing logits on the device; summing them in host memory")
            gpu.release()
            return predict_logits(data, backend, **run)

    def segment(
        self, volume: io.Volume, timings: Timings | None = None, on_tile: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        """uint8 labels of one volume, on its own grid."""
        timings = timings if timings is not None else Timings()
        labels = self.labels(volume, timings, on_tile)
        with timings.stage("export"):
            return labels.array()

    def labels(
        self, volume: io.Volume, timings: Timings | None = None, on_tile: Callable[[int, int], None] | None = None
    ) -> Labels:
        """uint8 labels of one volume, on its own grid, made when wanted: one model's labels in
        'labels' mode without postprocessing wait to be brought back as they are written."""
        timings = timings if timings is not None else Timings()
        cfg = self.config
        gpus = [gpu for model in self.models if (gpu := model.backend.gpu) is not None]
        for gpu in gpus:
            gpu.reset_peak()
        pre = self._preprocess(volume, timings)
        # one model exported as labels: the sliding window hands back labels, never all logits
        as_labels = len(self.models) == 1 and cfg.export.mode == "labels"
        with timings.stage("infer"):
            prediction = self._ensemble(pre, on_tile, as_labels)
        if gpus:
            timings.notes["gpu_peak"] = f"{max(gpu.peak_bytes() for gpu in gpus) / 2**30:.2f}GB"
        if as_labels and not self._postprocesses:
            return Labels.of(prediction, pre)  # brought back to the input's grid as it is written
        with timings.stage("export"):
            labels = to_original_grid(prediction, pre, mode=cfg.export.mode, resampler=cfg.preprocess.resampler)
        del prediction
        if self._postprocesses:
            with timings.stage("postprocess"):
                labels = self._postprocess(labels, volume)
        return Labels(labels)

    def _preprocess(self, volume: io.Volume, timings: Timings) -> Preprocessed:
        """The network's input; the tile shapes it needs compile in the background meanwhile, as
        soon as preprocessing knows the shape, and what is left of that is timed as 'compile'."""
        cfg = self.config
        compiling: list[Future] = []

        def compile_tiles(shape_zyx: tuple[int, int, int]) -> None:
            for model in self.models:
                backend = self._tile_backend(model, shape_zyx)
                if backend.needs_compile:
                    compiling.append(_COMPILER.submit(backend.compile))

        roi = None
        if self.locator is not None:
            with timings.stage("locate"):
                located = self.locator.locate(volume.array_zyx, volume.geometry.spacing_zyx_mm)
            timings.notes["locate"] = located.note
            roi = located.box
        with timings.stage("preprocess"):
            pre = preprocess(
                volume.array_zyx,
                volume.geometry.spacing_zyx_mm,
                self.plan,
                use_forced_spacing=cfg.preprocess.forced_spacing,
                resampler=cfg.preprocess.resampler,
                body_threshold=cfg.preprocess.body_threshold,
                body_margin_mm=cfg.preprocess.body_margin_mm,
                device=self.device,
                on_shape=compile_tiles,
                roi_zyx=roi,
            )
        if compiling:
            for model in self.models:  # the fitted tile's Gaussian map while its shape compiles
                tile = self._tile_backend(model, pre.data.shape[1:])
                importance_map(tuple(tile.patch_zyx), tile.z_halo)
            with timings.stage("compile"):
                for future in compiling:
                    future.result()
        return pre

    def _ensemble(self, pre: Preprocessed, on_tile: Callable[[int, int], None] | None,
                  as_labels: bool) -> np.ndarray:
        """The models' mean logits (or, for one model, its labels straight from the sliding window)."""
        prediction = self._logits(pre.data, self.models[0], on_tile, labels=as_labels, pad_values=pre.pad_values)
        for model in self.models[1:]:
            prediction += self._logits(pre.data, model, on_tile, pad_values=pre.pad_values)
        if len(self.models) > 1:
            prediction /= len(self.models)
        return prediction

    @property
    def _postprocesses(self) -> bool:
        post = self.config.postprocess
        return post.closing > 0 or post.min_component_mm3 > 0 or self.gate is not None

    def _postprocess(self, labels: np.ndarray, volume: io.Volume) -> np.ndarray:
        """Every label closed; small lesion components removed, then lesions outside the gate
        model's mask (with a margin)."""
        from flarebox.postprocess import close_labels, gate_by_mask, remove_small_components  # scipy: here only

        post, spacing = self.config.postprocess, volume.geometry.spacing_zyx_mm
        labels = close_labels(labels, post.closing)
        labels = remove_small_components(labels, spacing, post.min_component_mm3, post.label)
        if self.gate is not None and (labels == post.label).any():
            labels = gate_by_mask(labels, self.gate.segment(volume) > 0, spacing, post.gate_margin_mm, post.label)
        return labels


class Stopped(BaseException):  # noqa: N818 -- not an error: the process was asked to stop
    """SIGTERM or SIGINT arrived; raised in the main thread between two of its bytecodes. A
    BaseException, so that no per-case `except Exception` mistakes it for one bad case."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (docker stop, a time limit) and SIGINT raise Stopped in the main thread while active.
    Python's default leaves SIGTERM to kill the process, and a process that is PID 1 in a container
    ignores it altogether until docker's SIGKILL."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """Fail before any case is read, with one line: no input folder, or an output folder that cannot
    be made or written (found by writing a probe file, which also catches read-only mounts)."""
    if not input_dir.is_dir():
        raise ConfigError(f"{input_dir}: " + ("not a folder" if input_dir.exists() else "no such input folder"))
    try:
        next(os.scandir(input_dir), None)
    except OSError as error:
        raise ConfigError(f"{input_dir}: cannot read the input folder: {error.strerror or error}") from error
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{output_dir}: the output path is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".flarebox-probe.", suffix=io.PARTIAL_SUFFIX):
            pass
    except OSError as error:
        raise ConfigError(f"{output_dir}: cannot write the output folder: {error.strerror or error}") from error


@dataclass
class _Tally:
    """Cases done and failed; the writer thread reports into it too."""

    total: int
    failures: int = 0
    written: int = 0
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, case: io.Case, error: BaseException) -> None:
        with self.lock:
            self.failures += 1
        if isinstance(error, CaseError):
            log.error("%s: %s", case.path.name, error.reason)
        else:  # one broken case must not stop the others
            log.error("%s: failed: %s: %s", case.path.name, type(error).__name__, error)


@dataclass(frozen=True)
class _Written:
    """A case whose labels are ready, on its way to disk in the writer thread."""

    case: io.Case
    index: int
    labels: Labels
    geometry: io.Geometry
    timings: Timings

    def write(self, output_dir: Path, level: int, tally: _Tally,
              on_case: Callable[[io.Case, Timings], None] | None) -> None:
        """Write, then log the case's line at once (not when the next case is done)."""
        try:
            with self.timings.stage("write" if self.labels.bbox is None else "export+write"):
                io.write_labels(output_dir / f"{self.case.case_id}.nii.gz", self.labels.slabs(), self.geometry, level)
        except Exception as error:
            tally.failed(self.case, error)
            return
        with tally.lock:
            tally.written += 1
        log.info("[%d/%d] %s: %s", self.index, tally.total, self.case.case_id, self.timings.line())
        if on_case is not None:
            on_case(self.case, self.timings)


@dataclass(frozen=True)
class _Read:
    case: io.Case
    index: int  # 1-based, among the cases of the run
    need: Need | None
    volume: Future


@dataclass
class _Reads:
    """The cases, each with its read in flight, within the memory budget: a case whose estimated
    need cannot fit beside what the process holds is refused (one line) before it is read, and the
    next case is read while this one is segmented only when both fit; else after it."""

    pool: ThreadPoolExecutor
    cases: list[io.Case]
    tally: _Tally
    budget: Budget | None = None
    _next: int = 0

    def start(self) -> _Read | None:
        """The next case that can be read, its read submitted; None when none is left."""
        while self._next < len(self.cases):
            case = self.cases[self._next]
            self._next += 1
            try:
                need = self.budget.need(case.path) if self.budget is not None else None
                if need is not None and (reason := self.budget.refusal(need.total)):
                    raise CaseError(case.path, reason)
            except CaseError as error:
                self.tally.failed(case, error)
                continue
            return _Read(case, self._next, need, self.pool.submit(io.read_case, case))
        return None

    def fits_beside(self, current: _Read) -> bool:
        """Whether the next case's read may run while `current` is segmented."""
        if self.budget is None or self._next >= len(self.cases):
            return True
        try:
            need = current.need or self.budget.need(current.case.path)  # the first case's, read before the budget
            following = self.budget.need(self.cases[self._next].path)
        except CaseError:
            return True  # a read that fails at once, holding nothing
        if need is None or following is None:
            return True  # a header without a usable grid: that read fails at once too
        return self.budget.refusal(need.total + following.read) is None

    def following(self, first: _Read | None) -> Iterator[_Read]:
        """`first` (already started) and every case after it, each handed out with its read in flight."""
        current = first
        while current is not None:
            ahead = self.start() if self.fits_beside(current) else None
            yield current
            current = ahead if ahead is not None else self.start()


def _finish(writer: ThreadPoolExecutor, reader: ThreadPoolExecutor) -> None:
    """Let the write in flight end (even through further signals: a killed write leaves a temporary
    file behind) and drop the reads not started."""
    for pool, cancel in ((writer, False), (reader, True)):
        while True:
            try:
                pool.shutdown(wait=True, cancel_futures=cancel)
                break
            except Stopped:
                continue


def run_folder(predictor: Predictor | Callable[[], Predictor], input_dir: Path, output_dir: Path,
               on_case: Callable[[io.Case, Timings], None] | None = None, *, skip_existing: bool = False,
               budget: Budget | None = None) -> int:
    """Segment every case of a FLARE input folder; returns the number of failed inputs.

    predictor: a Predictor, or a function that builds one: the first case is then read while it runs.
    on_case: called with each written case and its timings (in the writer thread).
    skip_existing: leave out cases whose output is already there (a rerun after an interruption).
    budget: the memory budget (memory.py); by default the predictor's configuration's, known only
        once a predictor built by a function exists: the first case's read is then not checked,
        only its work.
    Raises ConfigError, before any case is read, when the folders are unusable, and Stopped when
    SIGTERM or SIGINT arrives (while `stop_on_signals` is active): the write in flight is completed,
    no case is left half-written, and the cases not done are simply missing.
    Per case, 'read' in the log is the time the case waited for its read (which started during the
    previous case), 'write' the writer thread's time; 'export+write' where the export back to the
    input's grid is streamed into the write (`Predictor.labels`). A case's line comes when its file
    is written."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_folders(input_dir, output_dir)
    cases, rejected = io.discover(input_dir)
    for error in rejected:
        log.error("%s: %s", Path(str(error.path)).name, error.reason)
    io.remove_partial_outputs(output_dir, [c.case_id for c in cases])
    done = [c for c in cases if skip_existing and (output_dir / f"{c.case_id}.nii.gz").is_file()]
    if done:
        log.info("%d case(s) already have an output: left as they are", len(done))
        cases = [c for c in cases if c not in done]
    tally = _Tally(total=len(cases), failures=len(rejected), skipped=len(done))
    start = time.perf_counter()
    reader, writer = ThreadPoolExecutor(1, "flarebox-read"), ThreadPoolExecutor(1, "flarebox-write")
    reads = _Reads(reader, cases, tally, budget)
    stopped: Stopped | None = None
    try:
        first = reads.start()  # now: the first case is read while the models load
        if not isinstance(predictor, Predictor):
            predictor = predictor()
        if reads.budget is None:
            reads.budget = Budget.from_config(predictor.config)
        level = predictor.config.export.compression_level
        io.itk()  # imported here, while the first case inflates, not after it in the reader
        writing: Future | None = None
        for read in reads.following(first):
            case, timings = read.case, Timings()
            try:
                with timings.stage("read"):
                    volume = read.volume.result()
                need = read.need or reads.budget.need(case.path)  # the first case's, read before the budget
                if need is not None and (reason := reads.budget.refusal(need.work)):
                    raise CaseError(case.path, reason)
                labels = predictor.labels(volume, timings)
            except Exception as error:
                tally.failed(case, error)
                volume = None
                continue
            if writing is not None:
                writing.result()  # one case's labels waiting at most: memory stays bounded
            writing = writer.submit(_Written(case, read.index, labels, volume.geometry, timings).write, output_dir,
                                    level, tally, on_case)
            del volume, labels
    except Stopped as signalled:
        stopped = signalled
        raise
    finally:
        _finish(writer, reader)
        if stopped is not None:
            log.warning("stopped by signal %d: %d of %d case(s) written, the others not started or not finished; "
                        "rerun to complete them", stopped.signum, tally.written, tally.total)
    kept = f" ({tally.skipped} already there)" if tally.skipped else ""
    log.info("%d case(s) written%s, %d failed, %.1fs in all", tally.written, kept, tally.failures,
             time.perf_counter() - start)
    return tally.failures
