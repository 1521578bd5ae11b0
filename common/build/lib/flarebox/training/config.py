"""Training configuration: one frozen dataclass, from TOML and/or keyword overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flarebox.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    iterations_per_epoch: int = 25
    batch_size: int = 2
    patch_zyx: tuple[int, ...] = ()  # training patch; empty = the plan's (inference) patch
    optimizer: str = "sgd"  # sgd (nnU-Net: momentum 0.99, nesterov, poly LR) | adamw
    learning_rate: float = 1e-2
    weight_decay: float = 3e-5
    foreground_oversampling: float = 0.33  # share of patches forced to contain foreground
    deep_supervision: bool = True
    spatial_augmentation: bool = True
    intensity_augmentation: bool = True
    validation_cases: int = 2  # held out from the dataset, scored with DSC every `validate_every` epochs
    validate_every: int = 10
    time_limit_minutes: float = 0.0  # stop early (and save) when reached; 0 = no limit
    seed: int = 0
    # Partial labels (Task 1, DKFZ): the classes annotated in this dataset; others may hide in the
    # background, so their probability is merged into background for the loss. Empty = all labelled.
    labelled_classes: tuple[int, ...] = ()
    device: str = "cpu"


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text()).get("train", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    raw.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"[train] {sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(names))})")
    if "patch_zyx" in raw:
        raw["patch_zyx"] = tuple(int(c) for c in raw["patch_zyx"])
    if "labelled_classes" in raw:
        raw["labelled_classes"] = tuple(int(c) for c in raw["labelled_classes"])
    config = TrainConfig(**raw)
    if config.optimizer not in ("sgd", "adamw"):
        raise ConfigError("[train] optimizer: must be sgd or adamw")
    if not 0 <= config.foreground_oversampling <= 1:
        raise ConfigError("[train] foreground_oversampling: must be in [0, 1]")
    return config
