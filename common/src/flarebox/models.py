"""Model folders: an nnU-Net v2 trained-model folder, read once into typed objects.

A model folder holds `plans.json`, `dataset.json` and `fold_<k>/checkpoint_final.pth` exactly as
nnU-Net v2 writes them (both the current plans format with an `architecture` entry and the pre-2.3
one with `UNet_class_name` ...). Our own trainer writes the same layout, and `convert` adds an
`openvino/` folder with IR files and a `manifest.json` holding their sha256. Torch is imported only
by the functions that build networks, so the CPU image needs none.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flarebox.errors import ConfigError
from flarebox.mind import CHANNEL_NAMES as MIND_CHANNEL_NAMES

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
LIGHT_UNET = "flarebox.networks.LightUNet"  # the 2.5D lightweight network (networks.py)


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation of one input channel, nnU-Net semantics.

    CTNormalization: clip to [clip_low, clip_high] (the foreground's 0.5 / 99.5 percentiles), then
    (x - mean) / std with the foreground statistics. ZScoreNormalization: per image.
    """

    scheme: str
    mean: float = 0.0
    std: float = 1.0
    clip_low: float = float("-inf")
    clip_high: float = float("inf")


@dataclass(frozen=True)
class Architecture:
    class_name: str
    kwargs: dict[str, Any]
    requires_import: tuple[str, ...]


@dataclass(frozen=True)
class ModelPlan:
    """Everything the engine needs from a model folder, in nnU-Net's transposed (z, y, x) axes."""

    folder: Path
    configuration: str
    spacing_zyx_mm: tuple[float, float, float]
    patch_zyx: tuple[int, int, int]
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    normalizations: tuple[Normalization, ...]
    use_mask_for_norm: tuple[bool, ...]
    labels: dict[str, int]
    architecture: Architecture
    folds: tuple[int, ...]
    # What the network reads: "intensity" (the normalised image), or "mind" (12 MIND-SSC channels
    # computed from it after resampling), told by dataset.json's channel names.
    input_features: str = "intensity"

    @property
    def patch_divisor_zyx(self) -> tuple[int, int, int]:
        """What a tile's size must divide by along each axis: the product of the network's strides
        (a 2.5D network's are in-plane only)."""
        total = np.asarray(self.architecture.kwargs["strides"], dtype=int).prod(axis=0)
        return tuple(int(v) for v in ([1] * (3 - len(total)) + list(total)))

    @property
    def z_halo(self) -> int:
        """Slices a 2.5D network reads on each side of the one it segments; 0 for a 3D network."""
        if not self.architecture.class_name.endswith(".LightUNet"):
            return 0
        return int(self.architecture.kwargs.get("slices", 3)) // 2

    @property
    def num_input_channels(self) -> int:
        return len(self.normalizations)

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1


def _legacy_architecture(cfg: dict[str, Any]) -> Architecture:
    """Rebuild the architecture entry of a pre-2.3 plans file, as nnU-Net itself does on load."""
    name = cfg["UNet_class_name"]
    if name == "PlainConvUNet":
        class_name, blocks_key = PLAIN_UNET, "n_conv_per_stage"
    elif name == "ResidualEncoderUNet":
        class_name, blocks_key = RESENC_UNET, "n_blocks_per_stage"
    else:
        raise ConfigError(f"plans.json: UNet_class_name {name!r} is neither PlainConvUNet nor ResidualEncoderUNet")
    n_stages = len(cfg["n_conv_per_stage_encoder"])
    dim = len(cfg["patch_size"])
    kwargs = {
        "n_stages": n_stages,
        "features_per_stage": [
            min(cfg["UNet_base_num_features"] * 2**i, cfg["unet_max_num_features"]) for i in range(n_stages)
        ],
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": cfg["conv_kernel_sizes"],
        "strides": cfg["pool_op_kernel_sizes"],
        blocks_key: cfg["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": cfg["n_conv_per_stage_decoder"],
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return Architecture(class_name, kwargs, ("conv_op", "norm_op", "dropout_op", "nonlin"))


def _configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    configs = plans.get("configurations", {})
    if name not in configs:
        raise ConfigError(f"plans.json: no configuration {name!r} (has {sorted(configs)})")
    cfg = dict(configs[name])
    parent = cfg.pop("inherits_from", None)
    if parent is not None:
        merged = _configuration(plans, parent)
        merged.update(cfg)
        cfg = merged
    return cfg


def _normalizations(plans: dict[str, Any], cfg: dict[str, Any]) -> tuple[Normalization, ...]:
    props = plans.get("foreground_intensity_properties_per_channel", {})
    out = []
    for channel, scheme in enumerate(cfg["normalization_schemes"]):
        if scheme == "CTNormalization":
            p = props.get(str(channel))
            if p is None:
                raise ConfigError(f"plans.json: CTNormalization of channel {channel} needs intensity properties")
            out.append(
                Normalization(scheme, float(p["mean"]), float(p["std"]),
                              float(p["percentile_00_5"]), float(p["percentile_99_5"]))
            )
        elif scheme in ("ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization"):
            out.append(Normalization(scheme))
        else:
            raise ConfigError(f"plans.json: normalisation scheme {scheme!r} is not supported")
    return tuple(out)


def _triple(values: Any, what: str) -> tuple:
    if len(values) != 3:
        raise ConfigError(f"plans.json: {what} must have 3 entries (3D models only), got {values}")
    return tuple(values)


def load_plan(folder: str | Path, configuration: str = "3d_fullres") -> ModelPlan:
    """Read a model folder's plans.json and dataset.json into a ModelPlan; fail with the reason."""
    folder = Path(folder)
    try:
        plans = json.loads((folder / "plans.json").read_text())
        dataset = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: not a model folder ({exc})") from exc
    cfg = _configuration(plans, configuration)
    if "architecture" in cfg:
        arch = cfg["architecture"]
        architecture = Architecture(arch["network_class_name"], dict(arch["arch_kwargs"]),
                                    tuple(arch.get("_kw_requires_import", ())))
    else:
        architecture = _legacy_architecture(cfg)
    labels = dataset["labels"]
    if any(not isinstance(v, int) for v in labels.values()):
        raise ConfigError(f"{folder}/dataset.json: region-based labels are not supported")
    # a fold is a checkpoint folder, or its OpenVINO IR alone (what the CPU image carries)
    folds = {int(p.name.split("_")[1]) for p in folder.glob("fold_*") if p.name[5:].isdigit()}
    folds |= {int(p.name.split("_")[1]) for p in folder.glob("openvino/fold_*_*.xml") if p.name.split("_")[1].isdigit()}
    folds = tuple(sorted(folds))
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    features = "mind" if names == MIND_CHANNEL_NAMES else "intensity"
    if names and len(names) != len(cfg["normalization_schemes"]):
        raise ConfigError(f"{folder}: dataset.json names {len(names)} channels, plans.json normalises "
                          f"{len(cfg['normalization_schemes'])}")
    return ModelPlan(
        folder=folder,
        configuration=configuration,
        spacing_zyx_mm=tuple(float(s) for s in _triple(cfg["spacing"], "spacing")),
        patch_zyx=tuple(int(p) for p in _triple(cfg["patch_size"], "patch_size")),
        transpose_forward=tuple(plans.get("transpose_forward", (0, 1, 2))),
        transpose_backward=tuple(plans.get("transpose_backward", (0, 1, 2))),
        normalizations=_normalizations(plans, cfg),
        use_mask_for_norm=tuple(
            bool(u) for u in cfg.get("use_mask_for_norm", [False] * len(cfg["normalization_schemes"]))
        ),
        labels={k: int(v) for k, v in labels.items()},
        architecture=architecture,
        folds=folds,
        input_features=features,
    )


def _known_classes() -> dict[str, Any]:
    """The classes nnU-Net plans name, by their class name, imported here in plain sight (plans give
    dotted paths, and classes move between releases: ResidualEncoderUNet left `residual_unet` for
    `unet`, so a plan's path is matched on the class name)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet

    from flarebox.networks import LightUNet

    classes = (PlainConvUNet, ResidualEncoderUNet, ResidualUNet, LightUNet, torch.nn.Conv2d, torch.nn.Conv3d,
               torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
               torch.nn.LeakyReLU, torch.nn.ReLU, torch.nn.Dropout2d, torch.nn.Dropout3d)
    return {cls.__name__: cls for cls in classes}


def _locate(dotted_name: str, what: str) -> Any:
    """A class named in plans.json: one of the known classes, else (a custom architecture in a
    user's folder) imported by its dotted path."""
    import pydoc

    found = _known_classes().get(dotted_name.rsplit(".", 1)[-1]) or pydoc.locate(dotted_name)
    if found is None:
        raise ConfigError(f"plans.json: cannot import {dotted_name!r} for {what}")
    return found


def build_network(plan: ModelPlan, deep_supervision: bool = False) -> Any:
    """Instantiate the plan's torch network (dynamic-network-architectures), weights uninitialised."""
    kwargs = dict(plan.architecture.kwargs)
    for key in plan.architecture.requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], key)
    network_class = _locate(plan.architecture.class_name, "the network class")
    kwargs["deep_supervision"] = deep_supervision
    return network_class(input_channels=plan.num_input_channels, num_classes=plan.num_classes, **kwargs)


def checkpoint_path(plan: ModelPlan, fold: int, checkpoint: str = "checkpoint_final.pth") -> Path:
    path = plan.folder / f"fold_{fold}" / checkpoint
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint missing")
    return path


def load_network(plan: ModelPlan, fold: int, checkpoint: str = "checkpoint_final.pth") -> Any:
    """Build the network and load one fold's nnU-Net checkpoint into it, in eval mode on the CPU."""
    import torch

    state = torch.load(checkpoint_path(plan, fold, checkpoint), map_location="cpu", weights_only=False)
    weights = state.get("network_weights", state)
    # torch.compile and DDP prefix parameter names; nnU-Net strips them the same way on load.
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in weights.items()}
    network = build_network(plan)
    network.load_state_dict(weights)
    return network.eval()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
