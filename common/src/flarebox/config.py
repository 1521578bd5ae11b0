"""Task configuration: a small TOML file per task folder, loaded once into frozen dataclasses.

Every key has a default; an unknown key or a bad value fails at start with the key and the reason.
Relative paths are relative to the config file. Example (task2_cpu_organs/config.toml):

    [model]
    folder = "weights/model"
    [inference]
    backend = "openvino"
    precision = "int8"
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flarebox.errors import ConfigError

# The choices each setting allows, defined here once; the stages that take them check against these.
BACKENDS = ("openvino", "torch")
# openvino "auto": chosen for the CPU it runs on (flarebox.cpu.openvino_precision)
PRECISIONS = {"openvino": ("auto", "f32", "bf16", "int8"), "torch": ("f32", "fp16", "bf16")}
EXPORT_MODES = ("labels", "logits")  # how export returns to the input grid (export.to_original_grid)
ENGINES = ("auto", "torch", "numpy")  # linear resampling engines (resample.resize_linear)


@dataclass(frozen=True)
class ModelConfig:
    folder: Path = Path("weights/model")
    configuration: str = "3d_fullres"
    folds: tuple[int, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    # more model folders to ensemble with `folder` (each with all its folds; logits averaged over
    # models). They must preprocess alike (spacing, transpose, normalisation); patches may differ.
    ensemble: tuple[Path, ...] = ()


@dataclass(frozen=True)
class PreprocessConfig:
    forced_spacing: bool = False  # 3D-CPS slice-count rule for the target spacing
    resampler: str = "auto"  # auto | torch | numpy
    features: str = "intensity"  # intensity | mind (12 MIND-SSC channels; the model must have been trained on them)
    # CT only: crop to voxels above this HU (plus a margin) before anything else; unset = nnU-Net's
    # nonzero crop only, which never crops a CT
    body_threshold: float | None = None
    body_margin_mm: float = 10.0


@dataclass(frozen=True)
class LocateConfig:
    """The locate stage (locate.py): a coarse pass finds the organs' box; the fine tiles cover it only."""

    mode: str = "off"  # off | network (a locator model of its own: `folder`) | model (the organ model, coarsened)
    folder: Path | None = None  # mode "network": the locator's model folder
    precision: str = "f32"  # the locator's precision, on the task's backend
    coarsen: float = 2.0  # mode "model": the organ model runs at this many times its plan's spacing
    labels: tuple[int, ...] = ()  # the labels whose box counts; none = every foreground label
    margin_mm: float = 20.0  # the box grows by this on every side
    min_size_mm: float = 30.0  # a box smaller than this along an axis is implausible: whole scan instead
    # the axes the box crops: "zyx", or "z" (slices only) for a 2.5D network, which was trained on
    # whole slices and whose GroupNorm sees a slice's whole field of view
    axes: str = "zyx"


@dataclass(frozen=True)
class InferenceConfig:
    backend: str = "openvino"  # openvino | torch
    device: str = "cpu"  # cpu | cuda | auto (cuda when available)
    # openvino: auto (by the CPU's instruction sets, flarebox/cpu.py) | f32 | bf16 | int8; torch: f32 | fp16 | bf16
    precision: str = "f32"
    step_size: float = 0.5
    mirroring: bool = False
    threads: int = 0  # 0 = the runtime's default (all cores)
    fit_patch: bool = False  # shrink the tile along axes where the image is smaller than the patch
    cache_dir: Path | None = None  # OpenVINO compiled-model cache
    # torch on CUDA: device memory for torch's allocations (the CUDA context, ~0.3-0.5 GB, comes on
    # top: 3.5 keeps a process within FLARE's 4 GB). Logits are summed on the GPU when they fit in
    # it, in host memory otherwise; see TorchBackend.accumulation_place.
    gpu_memory_gb: float = 3.5
    # host memory a run may use: a case whose estimated need (memory.py) does not fit beside what the
    # process holds is refused with one line, and the next case is read ahead only when both fit.
    # 0 = the container's limit (docker run -m), else the machine's memory
    memory_limit_gb: float = 0.0


@dataclass(frozen=True)
class ExportConfig:
    mode: str = "labels"  # labels | logits
    compression_level: int = 1


@dataclass(frozen=True)
class PostprocessConfig:
    """Clean-up on the original grid (postprocess.py); the defaults change nothing."""

    # every label closed with a (2 * closing + 1)^3 cube (1: the lightweight Task 2 entry's 3x3x3)
    closing: int = 0
    label: int = 1  # the label the lesion rules below apply to
    min_component_mm3: float = 0.0  # drop components smaller than this
    gate_config: Path | None = None  # a task config whose model's foreground gates the label
    gate_margin_mm: float = 10.0  # a component survives if within this distance of the gate's mask


@dataclass(frozen=True)
class TaskConfig:
    name: str = "task"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    locate: LocateConfig = field(default_factory=LocateConfig)


LOCATE_MODES = ("off", "network", "model")


def _build(cls: type, section: str, values: dict[str, Any], base: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(fields)})")
        default = fields[key].default
        if key in ("folder", "cache_dir", "gate_config") and value is not None:
            value = (base / value).resolve()
        elif key == "ensemble":
            value = tuple((base / v).resolve() for v in value)
        elif key in ("folds", "labels"):
            value = tuple(int(v) for v in value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"[{section}] {key}: expected true or false, got {value!r}")
        elif (isinstance(default, float) or key == "body_threshold") and isinstance(value, int) \
                and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    if "folder" in fields and "folder" not in kwargs and fields["folder"].default is not None:
        kwargs["folder"] = (base / fields["folder"].default).resolve()
    return cls(**kwargs)


def validate(config: TaskConfig) -> TaskConfig:
    inf = config.inference
    checks = [
        (inf.backend in BACKENDS, "[inference] backend", f"one of {BACKENDS}"),
        (inf.precision in PRECISIONS.get(inf.backend, ()), "[inference] precision",
         f"one of {PRECISIONS.get(inf.backend)} for {inf.backend}"),
        (inf.device in ("cpu", "cuda", "auto"), "[inference] device", "cpu, cuda or auto"),
        (0 < inf.step_size <= 1, "[inference] step_size", "in (0, 1]"),
        (config.export.mode in EXPORT_MODES, "[export] mode", f"one of {EXPORT_MODES}"),
        (config.preprocess.resampler in ENGINES, "[preprocess] resampler", f"one of {ENGINES}"),
        (config.preprocess.features in ("intensity", "mind"), "[preprocess] features", "intensity or mind"),
        (len(config.model.folds) > 0, "[model] folds", "at least one fold"),
        (inf.gpu_memory_gb > 0, "[inference] gpu_memory_gb", "positive"),
        (inf.memory_limit_gb >= 0, "[inference] memory_limit_gb", "zero (the container's limit) or positive"),
        (config.preprocess.body_margin_mm >= 0, "[preprocess] body_margin_mm", "zero or positive"),
        (config.postprocess.min_component_mm3 >= 0, "[postprocess] min_component_mm3", "zero or positive"),
        (0 <= config.postprocess.closing <= 5, "[postprocess] closing", "a radius in voxels from 0 (off) to 5"),
        (config.postprocess.gate_margin_mm >= 0, "[postprocess] gate_margin_mm", "zero or positive"),
        (config.postprocess.gate_config is None or config.postprocess.gate_config.is_file(),
         "[postprocess] gate_config", "an existing task config file"),
        (config.locate.mode in LOCATE_MODES, "[locate] mode", f"one of {LOCATE_MODES}"),
        (config.locate.mode != "network" or (config.locate.folder is not None and config.locate.folder.is_dir()),
         "[locate] folder", "an existing locator model folder for mode \"network\""),
        (config.locate.precision in PRECISIONS.get(inf.backend, ()), "[locate] precision",
         f"one of {PRECISIONS.get(inf.backend)} for {inf.backend}"),
        (config.locate.coarsen >= 1, "[locate] coarsen", "at least 1"),
        (config.locate.margin_mm >= 0, "[locate] margin_mm", "zero or positive"),
        (config.locate.min_size_mm >= 0, "[locate] min_size_mm", "zero or positive"),
        (config.locate.axes in ("zyx", "z"), "[locate] axes", "zyx or z"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {expected}")
    return config


def load_config(path: str | Path, **overrides: Any) -> TaskConfig:
    """Read a task config file; `overrides` are 'section.key' -> value pairs (from the command line)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    for dotted, value in overrides.items():
        if value is not None:
            section, key = dotted.split(".")
            raw.setdefault(section, {})[key] = value
    return from_dict(raw, path.parent, default_name=path.parent.name)


def from_dict(raw: dict[str, Any], base: Path, default_name: str = "task") -> TaskConfig:
    sections = {"model": ModelConfig, "preprocess": PreprocessConfig, "inference": InferenceConfig,
                "export": ExportConfig, "postprocess": PostprocessConfig, "locate": LocateConfig}
    kwargs: dict[str, Any] = {"name": raw.get("name", default_name)}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in sections:
            raise ConfigError(f"[{key}]: unknown section (known: {', '.join(sections)})")
        kwargs[key] = _build(sections[key], key, value, base)
    for key, cls in sections.items():
        kwargs.setdefault(key, _build(cls, key, {}, base))
    return validate(TaskConfig(**kwargs))
