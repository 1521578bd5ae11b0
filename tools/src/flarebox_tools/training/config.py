"""Training configuration: two frozen dataclasses, read once from TOML plus command-line overrides.

`[train]` (TrainConfig) says how to train; `[network]` (NetworkSpec), optional, says which model to
create when the output folder has no plans.json yet. A bad key or value fails at start, naming the
key and the reason. Example:

    [network]
    residual = false                      # PlainConvUNet (false) or ResidualEncoderUNet (true)
    features_per_stage = [8, 16, 32, 64, 128, 128]
    strides_zyx = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    kernel_sizes_zyx = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    blocks_per_stage = [2, 2, 2, 2, 2, 2]
    spacing_zyx_mm = [2.5, 2.5, 2.5]
    patch_zyx = [40, 224, 192]
    ct_clip_hu = [-958, 270]
    ct_mean_hu = -97.3
    ct_std_hu = 137.8

    [train]
    epochs = 100
    batch_size = 2                        # global: split over torchrun ranks as nnU-Net splits it
    cps_weight = 0.5                      # cross pseudo supervision: two networks teach each other; 0 = off
    [train.partial_labels]                # case-id prefix (source dataset) -> the classes it annotates
    "kits_" = [1]
    "unl_" = []                           # annotates nothing: unlabelled, learnt from by CPS only

The lightweight 2.5D network (flarebox.networks.LightUNet) is `kind = "light"` in `[network]`:
in-plane strides and [1, 3, 3] kernels, `patch_zyx` = slices per inference tile x 192 x 192.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flarebox.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
AMP_DTYPES = ("auto", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """How to train one fold. Defaults are nnU-Net v2's (nnUNetTrainer) unless a comment says why."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    batch_size: int = 2  # global; under torchrun each rank takes its share
    patch_zyx: tuple[int, int, int] | None = None  # training patch; None = the plan's (inference) patch
    optimizer: str = "sgd"  # sgd: momentum 0.99, Nesterov; adamw
    learning_rate: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    poly_exponent: float = 0.9  # lr = learning_rate * (1 - epoch / epochs) ** poly_exponent
    grad_clip_norm: float = 12.0
    foreground_oversampling: float = 0.33  # share of patches forced to hold a (randomly chosen) foreground class
    deep_supervision: bool = True
    batch_dice: bool = False  # Dice over the whole batch (all ranks) instead of per sample
    # spatial augmentation (nnU-Net: rotation and scaling with p = 0.2 each, mirroring p = 0.5 per axis)
    spatial_augmentation: bool = True
    rotation_deg: float = 30.0  # uniform in +-rotation_deg about each axis (in-plane only for flat patches)
    scale_range: tuple[float, float] = (0.7, 1.4)
    elastic_deformation: bool = False  # nnU-Net v2 turned it off by default
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # (z, y, x) axes flipped with p = 0.5; () = none
    intensity_augmentation: bool = True  # noise, blur, brightness, contrast, low resolution, gamma
    # validation: held-out cases of this fold, scored with the FLARE metrics every few epochs
    validation_cases: int = 2
    validate_every_epochs: int = 10
    validation_step: float = 0.5  # sliding-window step when validating (1.0: ~4-8x fewer tiles in 3D)
    # checkpoint_latest.pth this often (and when SIGTERM or SIGINT stops the run): a killed run loses
    # at most this much, and rerunning the same command goes on from there
    checkpoint_every_minutes: float = 5.0
    # total training time (over all resumed pieces) that ends the run and drives the poly schedule
    # instead of the epochs; 0 = no limit
    time_limit_minutes: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>; under torchrun, cuda means each rank's local GPU
    # autocast: on CUDA fp16 with grad scaling; on the CPU bf16 where it has native bf16 (AVX-512 BF16
    # or AMX), else f32 (emulated bf16 is slower than f32)
    amp: bool = True
    amp_dtype: str = "auto"  # auto | float16 | bfloat16 (bfloat16 forces it on any CPU)
    channels_last: bool = True  # channels-last-3d tensors: oneDNN's faster layout for 3D convolutions
    data_workers: int = 1  # processes making batches beside the step; 0 = in the main process
    # start from these weights instead of He initialisation (a checkpoint_final.pth of the same
    # network: fine-tuning, or a longer schedule after a shorter one); "" = none
    init_weights: str = ""
    # Partial labels: (case-id prefix, classes that source dataset annotates). A case matching no
    # prefix is fully labelled; one declared with no class ([]) is unlabelled, and only cross pseudo
    # supervision learns from it. See loss.py for what the loss does with the other classes.
    partial_labels: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Cross pseudo supervision (3D-CPS, FLARE.md): a second network of the same plan, initialised
    # with seed + 1, trains beside the first; besides the labels, each learns the other's argmax on
    # every sample, labelled or not, weighted by cps_weight (published: 0.5) ramped linearly from 0
    # over cps_ramp_epochs. 0 = off. The first network is the model saved.
    cps_weight: float = 0.0
    cps_ramp_epochs: float = 10.0
    unlabelled_share: float = 0.5  # with CPS: the share of samples drawn from the unlabelled cases

    def labelled_classes(self, case_id: str) -> tuple[int, ...] | None:
        """The foreground classes annotated in this case, or None when all are."""
        for prefix, classes in self.partial_labels:
            if case_id.startswith(prefix):
                return classes
        return None


@dataclass(frozen=True)
class NetworkSpec:
    """The model folder to create: an nnU-Net `3d_fullres` plan for a PlainConvUNet or
    ResidualEncoderUNet (kind "unet"), or for the lightweight 2.5D network (kind "light",
    flarebox.networks.LightUNet: strides and 3x3 kernels in-plane only, `blocks_per_stage` equal,
    the patch's z the slices of a tile)."""

    features_per_stage: tuple[int, ...]
    strides_zyx: tuple[tuple[int, int, int], ...]
    kernel_sizes_zyx: tuple[tuple[int, int, int], ...]
    blocks_per_stage: tuple[int, ...]  # convs (plain) or residual blocks (residual) per encoder stage
    spacing_zyx_mm: tuple[float, float, float]
    patch_zyx: tuple[int, int, int]
    residual: bool = False
    decoder_convs_per_stage: tuple[int, ...] | None = None  # None: nnU-Net's default (2 plain, 1 residual)
    normalization: str = "CTNormalization"  # CTNormalization | ZScoreNormalization
    ct_clip_hu: tuple[float, float] = (-1024.0, 3071.0)
    ct_mean_hu: float = 0.0
    ct_std_hu: float = 1.0
    batch_size: int = 2  # recorded in plans.json, as nnU-Net records it
    # intensity: the normalised image; mind: 12 MIND-SSC channels computed from it (flarebox.mind),
    # for a model that must work across modalities (Task 3's CT-trained model applied to MRI)
    input_features: str = "intensity"
    kind: str = "unet"  # unet | light
    slices: int = 3  # kind light: adjacent slices a sample reads (odd)
    norm_groups: int = 8  # kind light: GroupNorm's groups

    @property
    def decoder_convs(self) -> tuple[int, ...]:
        if self.decoder_convs_per_stage is not None:
            return self.decoder_convs_per_stage
        return (1 if self.residual else 2,) * (len(self.features_per_stage) - 1)


def _fail(table: str, key: str, reason: str) -> ConfigError:
    return ConfigError(f"[{table}] {key}: {reason}")


def _convert(table: str, cls: type, raw: dict[str, Any]) -> Any:
    """Build a frozen dataclass from a TOML table: unknown keys, missing keys and bad types fail."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise _fail(table, unknown[0], f"unknown key (known: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        kind = str(fields[name].type)
        try:
            if name == "partial_labels":
                if not isinstance(value, dict):
                    raise TypeError("expected a table of prefix = [classes]")
                value = tuple((str(k), tuple(int(c) for c in v)) for k, v in value.items())
            elif kind.startswith("tuple[tuple"):
                value = tuple(tuple(int(c) for c in row) for row in value)
            elif "tuple[float" in kind:
                value = tuple(float(c) for c in value)
            elif "tuple[int" in kind:
                value = None if value is None else tuple(int(c) for c in value)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise TypeError(f"expected true or false, got {value!r}")
            elif kind == "int":
                if isinstance(value, bool) or int(value) != value:
                    raise TypeError(f"expected an integer, got {value!r}")
                value = int(value)
            elif kind == "float":
                value = float(value)
            elif kind == "str":
                value = str(value)
        except (TypeError, ValueError) as exc:
            raise _fail(table, name, str(exc)) from exc
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"[{table}]: {exc}") from exc


def _validate_train(c: TrainConfig) -> None:
    checks = [
        ("optimizer", c.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
        ("epochs", c.epochs >= 1, "must be at least 1"),
        ("iterations_per_epoch", c.iterations_per_epoch >= 1, "must be at least 1"),
        ("batch_size", c.batch_size >= 1, "must be at least 1"),
        ("learning_rate", c.learning_rate > 0, "must be positive"),
        ("foreground_oversampling", 0 <= c.foreground_oversampling <= 1, "must be in [0, 1]"),
        ("scale_range", len(c.scale_range) == 2 and 0 < c.scale_range[0] <= c.scale_range[1], "must be [low, high]"),
        ("mirror_axes", all(a in (0, 1, 2) for a in c.mirror_axes), "axes are 0 (z), 1 (y), 2 (x)"),
        ("patch_zyx", c.patch_zyx is None or (len(c.patch_zyx) == 3 and min(c.patch_zyx) > 0), "3 positive sizes"),
        ("validate_every_epochs", c.validate_every_epochs >= 1, "must be at least 1"),
        ("validation_step", 0 < c.validation_step <= 1, "must be in (0, 1]"),
        ("amp_dtype", c.amp_dtype in AMP_DTYPES, f"must be one of {AMP_DTYPES}"),
        ("data_workers", c.data_workers >= 0, "must be 0 or more"),
        ("checkpoint_every_minutes", c.checkpoint_every_minutes > 0, "must be positive"),
        ("partial_labels", all(all(k > 0 for k in ks) for _, ks in c.partial_labels), "classes are labels > 0"),
        ("cps_weight", c.cps_weight >= 0, "zero (off) or positive"),
        ("cps_ramp_epochs", c.cps_ramp_epochs >= 0, "zero or positive"),
        ("unlabelled_share", 0 <= c.unlabelled_share < 1, "must be in [0, 1)"),
    ]
    for key, ok, reason in checks:
        if not ok:
            raise _fail("train", key, reason)


def _validate_network(n: NetworkSpec) -> None:
    stages = len(n.features_per_stage)
    checks = [
        ("strides_zyx", len(n.strides_zyx) == stages, f"needs one entry per stage ({stages})"),
        ("kernel_sizes_zyx", len(n.kernel_sizes_zyx) == stages, f"needs one entry per stage ({stages})"),
        ("blocks_per_stage", len(n.blocks_per_stage) == stages, f"needs one entry per stage ({stages})"),
        ("decoder_convs_per_stage", len(n.decoder_convs) == stages - 1, f"needs {stages - 1} entries"),
        ("normalization", n.normalization in ("CTNormalization", "ZScoreNormalization"),
         "CTNormalization or ZScoreNormalization"),
        ("input_features", n.input_features in ("intensity", "mind"), "intensity or mind"),
        ("spacing_zyx_mm", len(n.spacing_zyx_mm) == 3 and min(n.spacing_zyx_mm) > 0, "3 positive spacings"),
        ("ct_std_hu", n.ct_std_hu > 0, "must be positive"),
        ("kind", n.kind in ("unet", "light"), "unet or light"),
    ]
    if n.kind == "light":
        checks += [
            ("strides_zyx", all(s[0] == 1 and s[1] == s[2] for s in n.strides_zyx),
             "kind light strides in-plane only and alike in y and x, e.g. [1, 2, 2]"),
            ("kernel_sizes_zyx", all(tuple(k) == (1, 3, 3) for k in n.kernel_sizes_zyx), "kind light: [1, 3, 3]"),
            ("blocks_per_stage", len(set(n.blocks_per_stage)) == 1, "kind light: the same count in every stage"),
            ("slices", n.slices >= 1 and n.slices % 2 == 1, "odd and positive"),
            ("patch_zyx", n.patch_zyx[0] > 2 * (n.slices // 2), "kind light: more slices than the neighbours read"),
            ("residual", not n.residual, "kind light has no residual variant"),
        ]
    for key, ok, reason in checks:
        if not ok:
            raise _fail("network", key, reason)
    total = [1, 1, 1]
    for stride in n.strides_zyx:
        total = [t * s for t, s in zip(total, stride, strict=True)]
    if any(p % t for p, t in zip(n.patch_zyx, total, strict=True)):
        raise _fail("network", "patch_zyx", f"{list(n.patch_zyx)} must be divisible by the total stride {total}")


def load_config(path: str | Path | None = None, **overrides: Any) -> tuple[TrainConfig, NetworkSpec | None]:
    """Read `[train]` and `[network]` from a TOML file (either may be absent); keyword overrides
    (None = not given) replace `[train]` keys."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    unknown = sorted(set(doc) - {"train", "network"})
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}] (known: [train], [network])")
    raw = dict(doc.get("train", {}))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    train = _convert("train", TrainConfig, raw)
    _validate_train(train)
    network = None
    if "network" in doc:
        network = _convert("network", NetworkSpec, doc["network"])
        _validate_network(network)
    return train, network


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy with some fields changed."""
    out = dataclasses.replace(config, **changes)
    _validate_train(out)
    return out
