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

from flarebox.backends import BACKENDS, PRECISIONS
from flarebox.errors import ConfigError
from flarebox.export import EXPORT_MODES


@dataclass(frozen=True)
class ModelConfig:
    folder: Path = Path("weights/model")
    configuration: str = "3d_fullres"
    folds: tuple[int, ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"


@dataclass(frozen=True)
class PreprocessConfig:
    forced_spacing: bool = False  # 3D-CPS slice-count rule for the target spacing
    resampler: str = "auto"  # auto | torch | scipy
    features: str = "intensity"  # intensity | mind (12 MIND-SSC channels; the model must have been trained on them)


@dataclass(frozen=True)
class InferenceConfig:
    backend: str = "openvino"  # openvino | torch
    device: str = "cpu"  # cpu | cuda | auto (cuda when available)
    precision: str = "f32"  # openvino: f32 | bf16 | int8; torch: f32 | fp16 | bf16
    step_size: float = 0.5
    mirroring: bool = False
    threads: int = 0  # 0 = the runtime's default (all cores)
    cache_dir: Path | None = None  # OpenVINO compiled-model cache


@dataclass(frozen=True)
class ExportConfig:
    mode: str = "labels"  # labels | logits
    compression_level: int = 1


@dataclass(frozen=True)
class TaskConfig:
    name: str = "task"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _build(cls: type, section: str, values: dict[str, Any], base: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(fields)})")
        default = fields[key].default
        if key in ("folder", "cache_dir") and value is not None:
            value = (base / value).resolve()
        elif key == "folds":
            value = tuple(int(v) for v in value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"[{section}] {key}: expected true or false, got {value!r}")
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    if "folder" in fields and "folder" not in kwargs:
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
        (config.preprocess.resampler in ("auto", "torch", "scipy"), "[preprocess] resampler",
         "auto, torch or scipy"),
        (config.preprocess.features in ("intensity", "mind"), "[preprocess] features", "intensity or mind"),
        (len(config.model.folds) > 0, "[model] folds", "at least one fold"),
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
                "export": ExportConfig}
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
