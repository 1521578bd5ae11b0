"""nnU-Net v2 trained-model folders with seeded random weights, as test fixtures.

`make_trained_model_folder` writes what nnU-Net v2's trainer leaves behind for a `3d_fullres`
model: `plans.json` (a `2d` and a `3d_fullres` configuration, every key the 2.8 planner writes,
in its order), `dataset.json`, `dataset_fingerprint.json` and `fold_<k>/checkpoint_final.pth`
with the keys nnUNetTrainer.save_checkpoint writes. `plans_format="legacy"` writes the pre-2.3
plans (`UNet_class_name`, `n_conv_per_stage_encoder`, ... as nnunetv2 2.2.1 wrote them) instead
of the `architecture` entry. The weights are those of a network built with deep supervision, as
nnU-Net trains it, initialised as nnU-Net initialises it (He normal with a = 1e-2 and zero biases
on every convolution; in residual blocks the last norm's affine parameters set to zero).

Only torch, dynamic-network-architectures and the standard library are used, so the same module
builds fixtures for our engine (.venv) and for nnU-Net itself (.venv-nnunet); nnunetv2 is never
imported. Presets: the published FLARE networks and tiny ones for fast tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

ORGANS = ("liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava", "right_adrenal_gland",
          "left_adrenal_gland", "gallbladder", "esophagus", "stomach", "duodenum", "left_kidney")
ORGAN_LABELS = MappingProxyType({"background": 0, **{name: i for i, name in enumerate(ORGANS, start=1)}})
LESION_LABELS = MappingProxyType({"background": 0, "lesion": 1})

_CLASS_PATH = {  # where nnU-Net 2.8's planners point; the legacy loader maps UNet_class_name itself
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
# (experiment_planner_used, plans_name) per architecture and plans format
_PLANNER = {
    ("PlainConvUNet", "current"): ("ExperimentPlanner", "nnUNetPlans"),
    ("ResidualEncoderUNet", "current"): ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    ("PlainConvUNet", "legacy"): ("ExperimentPlanner", "nnUNetPlans"),
    ("ResidualEncoderUNet", "legacy"): ("ResEncUNetPlanner", "nnUNetResEncUNetPlans"),
}
# nnU-Net's planner defaults for blocks per encoder stage and convolutions per decoder stage
_DEFAULT_BLOCKS = {"PlainConvUNet": (2,) * 14, "ResidualEncoderUNet": (1, 3, 4, 6) + (6,) * 10}
_DEFAULT_DECODER = {"PlainConvUNet": 2, "ResidualEncoderUNet": 1}
_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
_RESAMPLING = "resample_data_or_seg_to_shape"


def _resampling_kwargs(is_seg: bool, order: int) -> dict[str, Any]:
    return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}


def _intensity_properties(normalization: str, intensity: Mapping[str, float] | None) -> dict[str, float]:
    """One channel's foreground statistics in the fingerprint's (sorted) key order."""
    if intensity is None:
        if normalization == "CTNormalization":
            raise ValueError("CTNormalization needs intensity= {mean, std, percentile_00_5, percentile_99_5}")
        # plausible MRI statistics: z-score normalisation never reads them, but nnU-Net writes them
        intensity = {"mean": 480.0, "std": 260.0, "percentile_00_5": 12.0, "percentile_99_5": 1450.0}
    missing = {"mean", "std", "percentile_00_5", "percentile_99_5"} - set(intensity)
    if missing:
        raise ValueError(f"intensity lacks {sorted(missing)}")
    props = {
        "max": intensity.get("max", intensity["percentile_99_5"]),
        "mean": intensity["mean"],
        "median": intensity.get("median", intensity["mean"]),
        "min": intensity.get("min", intensity["percentile_00_5"]),
        "percentile_00_5": intensity["percentile_00_5"],
        "percentile_99_5": intensity["percentile_99_5"],
        "std": intensity["std"],
    }
    return {k: float(v) for k, v in props.items()}


def _arch_kwargs(arch: str, dim: int, features: Sequence[int], kernels: Sequence[Sequence[int]],
                 strides: Sequence[Sequence[int]], blocks: Sequence[int], decoder: Sequence[int]) -> dict[str, Any]:
    """`arch_kwargs` in the order nnU-Net 2.8's planners write them."""
    return {
        "n_stages": len(features),
        "features_per_stage": list(features),
        "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        ("n_conv_per_stage" if arch == "PlainConvUNet" else "n_blocks_per_stage"): list(blocks),
        "n_conv_per_stage_decoder": list(decoder),
        "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def _legacy_architecture(arch: str, features: Sequence[int], kernels: Sequence[Sequence[int]],
                         strides: Sequence[Sequence[int]], blocks: Sequence[int],
                         decoder: Sequence[int]) -> dict[str, Any]:
    """The pre-2.3 architecture keys (nnunetv2 2.2.1's ExperimentPlanner.get_plans_for_configuration)."""
    base, top = features[0], max(features)
    if list(features) != [min(base * 2**i, top) for i in range(len(features))]:
        raise ValueError(f"legacy plans can only express features min(base * 2**i, max), not {list(features)}")
    dim = len(strides[0])
    return {
        "UNet_class_name": arch,
        "UNet_base_num_features": base,
        "n_conv_per_stage_encoder": list(blocks),
        "n_conv_per_stage_decoder": list(decoder),
        "num_pool_per_axis": [sum(1 for s in strides if s[axis] > 1) for axis in range(dim)],
        "pool_op_kernel_sizes": [list(s) for s in strides],
        "conv_kernel_sizes": [list(k) for k in kernels],
        "unet_max_num_features": top,
    }


def _configuration(*, arch: str, plans_format: str, data_identifier: str, batch_size: int, patch: Sequence[int],
                   median_shape: Sequence[float], spacing: Sequence[float], normalization: str,
                   use_mask_for_norm: bool, features: Sequence[int], kernels: Sequence[Sequence[int]],
                   strides: Sequence[Sequence[int]], blocks: Sequence[int], decoder: Sequence[int],
                   batch_dice: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "data_identifier": data_identifier,
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": [int(p) for p in patch],
        "median_image_size_in_voxels": [float(m) for m in median_shape],
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": [normalization],
        "use_mask_for_norm": [use_mask_for_norm],
    }
    if plans_format == "legacy":
        cfg.update(_legacy_architecture(arch, features, kernels, strides, blocks, decoder))
    cfg.update({
        "resampling_fn_data": _RESAMPLING,
        "resampling_fn_seg": _RESAMPLING,
        "resampling_fn_data_kwargs": _resampling_kwargs(False, 3),
        "resampling_fn_seg_kwargs": _resampling_kwargs(True, 1),
        "resampling_fn_probabilities": _RESAMPLING,
        "resampling_fn_probabilities_kwargs": _resampling_kwargs(False, 1),
    })
    if plans_format == "current":
        cfg["architecture"] = {
            "network_class_name": _CLASS_PATH[arch],
            "arch_kwargs": _arch_kwargs(arch, len(patch), features, kernels, strides, blocks, decoder),
            "_kw_requires_import": list(_REQUIRES_IMPORT),
        }
    cfg["batch_dice"] = batch_dice
    return cfg


def _topology_2d(patch_yx: Sequence[int], max_features: int = 512) -> tuple[list, list, list]:
    """A plausible 2d configuration's topology: pool each axis while it stays >= 8 voxels (nnU-Net's
    minimum feature-map edge is 4), 3x3 kernels, features doubling from 32 up to 512."""
    edges, strides = list(patch_yx), [[1, 1]]
    while any(e >= 8 for e in edges) and len(strides) < 8:
        step = [2 if e >= 8 else 1 for e in edges]
        edges = [e // s for e, s in zip(edges, step, strict=True)]
        strides.append(step)
    features = [min(32 * 2**i, max_features) for i in range(len(strides))]
    return features, strides, [[3, 3]] * len(strides)


def write_plans_and_dataset(
    path: str | Path,
    *,
    arch: Literal["PlainConvUNet", "ResidualEncoderUNet"] = "PlainConvUNet",
    plans_format: Literal["current", "legacy"] = "current",
    patch_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    features_per_stage: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    convs_per_decoder_stage: Sequence[int] | None = None,
    num_classes: int | None = None,
    labels: Mapping[str, int] | None = None,
    normalization: Literal["CTNormalization", "ZScoreNormalization"] = "CTNormalization",
    intensity: Mapping[str, float] | None = None,
    channel_name: str | None = None,
    use_mask_for_norm: bool = False,
    transpose_forward: Sequence[int] = (0, 1, 2),
    median_shape_zyx: Sequence[float] | None = None,
    batch_size: int = 2,
    dataset_name: str = "Dataset001_Flarebox",
    num_training: int = 50,
) -> Path:
    """Write plans.json, dataset.json and dataset_fingerprint.json of a trained-model folder.

    patch_zyx, spacing_zyx_mm, strides and kernel_sizes are in nnU-Net's transposed axis order
    (the plans' own order; z, y, x when transpose_forward is the identity). blocks_per_stage is
    n_conv_per_stage (PlainConvUNet) or n_blocks_per_stage (ResidualEncoderUNet); both default to
    nnU-Net's planner values. labels default to the 13 FLARE organs for 14 classes, background +
    lesion for 2, else class_<i>. channel_name defaults to "CT" or "MRI" by the normalisation (nnU-Net
    picks CTNormalization from a channel named CT). Returns the folder.
    """
    if arch not in _CLASS_PATH or plans_format not in ("current", "legacy"):
        raise ValueError(f"unknown arch {arch!r} or plans_format {plans_format!r}")
    if normalization not in ("CTNormalization", "ZScoreNormalization"):
        raise ValueError(f"unsupported normalization {normalization!r}")
    n_stages = len(features_per_stage)
    if not (len(strides) == len(kernel_sizes) == n_stages and len(patch_zyx) == len(spacing_zyx_mm) == 3):
        raise ValueError("features_per_stage, strides and kernel_sizes need one entry per stage; patch and spacing 3")
    blocks = list(blocks_per_stage or _DEFAULT_BLOCKS[arch][:n_stages])
    decoder = list(convs_per_decoder_stage or [_DEFAULT_DECODER[arch]] * (n_stages - 1))
    if labels is None:
        labels = _default_labels(num_classes or len(ORGAN_LABELS))
    elif num_classes is not None and num_classes != max(labels.values()) + 1:
        raise ValueError(f"num_classes {num_classes} disagrees with labels {dict(labels)}")
    channel_name = channel_name or ("CT" if normalization == "CTNormalization" else "MRI")
    transpose_forward = [int(a) for a in transpose_forward]
    transpose_backward = [transpose_forward.index(a) for a in range(3)]
    median_shape = list(median_shape_zyx or [2.0 * p for p in patch_zyx])
    props = _intensity_properties(normalization, intensity)

    planner, plans_name = _PLANNER[(arch, plans_format)]
    common = {"arch": arch, "plans_format": plans_format, "normalization": normalization,
              "use_mask_for_norm": use_mask_for_norm}
    features_2d, strides_2d, kernels_2d = _topology_2d(patch_zyx[1:])
    if plans_format == "legacy":  # 2.2.1 named the data after the plans; 2.8's ResEnc planners reuse nnUNetPlans'
        data_2d, data_3d = f"{plans_name}_2d", f"{plans_name}_3d_fullres"
    else:
        data_2d, data_3d = "nnUNetPlans_2d", "nnUNetPlans_3d_fullres"
    plans = {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": [float(s) for s in spacing_zyx_mm],
        "original_median_shape_after_transp": [int(round(m)) for m in median_shape],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose_forward,
        "transpose_backward": transpose_backward,
        "configurations": {
            "2d": _configuration(
                **common, data_identifier=data_2d, batch_size=12, patch=list(patch_zyx[1:]),
                median_shape=median_shape[1:], spacing=spacing_zyx_mm[1:], features=features_2d,
                kernels=kernels_2d, strides=strides_2d, blocks=_DEFAULT_BLOCKS[arch][: len(features_2d)],
                decoder=[_DEFAULT_DECODER[arch]] * (len(features_2d) - 1), batch_dice=True),
            "3d_fullres": _configuration(
                **common, data_identifier=data_3d, batch_size=batch_size, patch=patch_zyx,
                median_shape=median_shape, spacing=spacing_zyx_mm, features=features_per_stage,
                kernels=kernel_sizes, strides=strides, blocks=blocks, decoder=decoder, batch_dice=False),
        },
        "experiment_planner_used": planner,
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": props},
    }
    dataset = {"channel_names": {"0": channel_name}, "labels": dict(labels), "numTraining": num_training,
               "file_ending": ".nii.gz"}
    # nnU-Net writes the fingerprint with sorted keys; spacings and shapes are per training case
    # (nnU-Net axis order), here num_training copies of the median.
    fingerprint = {
        "foreground_intensity_properties_per_channel": {"0": props},
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [[int(round(m)) for m in median_shape]] * num_training,
        "spacings": [[float(s) for s in spacing_zyx_mm]] * num_training,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("plans.json", plans), ("dataset.json", dataset), ("dataset_fingerprint.json", fingerprint)):
        # batchgenerators' save_json: indent 4, no trailing newline
        (folder / name).write_text(json.dumps(content, indent=4))
    return folder


def _default_labels(num_classes: int) -> dict[str, int]:
    if num_classes == len(ORGAN_LABELS):
        return dict(ORGAN_LABELS)
    if num_classes == 2:
        return dict(LESION_LABELS)
    return {"background": 0, **{f"class_{i}": i for i in range(1, num_classes)}}


def build_network(folder: str | Path, *, deep_supervision: bool = True) -> torch.nn.Module:
    """The folder's 3d_fullres network (dynamic-network-architectures), as nnU-Net builds it for
    training (deep supervision on) or inference (off). Legacy plans are read as nnU-Net 2.8 reads them."""
    import pydoc

    folder = Path(folder)
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    if "architecture" in cfg:
        arch = cfg["architecture"]
        class_path, kwargs, requires_import = arch["network_class_name"], dict(arch["arch_kwargs"]), \
            arch["_kw_requires_import"]
    else:
        name = cfg["UNet_class_name"]
        n_stages = len(cfg["n_conv_per_stage_encoder"])
        class_path = _CLASS_PATH[name]
        kwargs = _arch_kwargs(name, len(cfg["patch_size"]),
                              [min(cfg["UNet_base_num_features"] * 2**i, cfg["unet_max_num_features"])
                               for i in range(n_stages)],
                              cfg["conv_kernel_sizes"], cfg["pool_op_kernel_sizes"], cfg["n_conv_per_stage_encoder"],
                              cfg["n_conv_per_stage_decoder"])
        requires_import = _REQUIRES_IMPORT
    for key in requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    network_class = pydoc.locate(class_path)
    if network_class is None:
        raise ImportError(f"cannot import {class_path}")
    return network_class(input_channels=len(dataset["channel_names"]), num_classes=max(dataset["labels"].values()) + 1,
                         deep_supervision=deep_supervision, **kwargs)


def nnunet_initialise(network: torch.nn.Module) -> None:
    """nnU-Net's initialisation (dynamic_network_architectures' InitWeights_He(1e-2), plus
    init_last_bn_before_add_to_0 for residual encoders), written with torch.nn.init."""
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD

    convs = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    for module in network.modules():
        if isinstance(module, convs):
            torch.nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for module in network.modules():
        last = module.conv2 if isinstance(module, BasicBlockD) else module.conv3 if isinstance(module, BottleneckD) \
            else None
        if last is not None:
            torch.nn.init.zeros_(last.norm.weight)
            torch.nn.init.zeros_(last.norm.bias)


def _training_log(epochs: int, num_foreground: int, generator: torch.Generator) -> dict[str, list]:
    """nnUNetLogger's my_fantastic_logging after `epochs` epochs: plausible falling losses and rising Dice."""
    t = torch.linspace(0, 1, epochs, dtype=torch.float64)
    noise = torch.rand(epochs, generator=generator, dtype=torch.float64)
    train = -0.2 - 0.7 * (1 - torch.exp(-5 * t)) + 0.02 * noise
    dice = 0.3 + 0.55 * (1 - torch.exp(-5 * t)) + 0.02 * noise
    ema = dice.clone()
    for i in range(1, epochs):
        ema[i] = 0.9 * ema[i - 1] + 0.1 * dice[i]
    per_class = (dice[:, None] + 0.05 * torch.rand(epochs, num_foreground, generator=generator, dtype=torch.float64))
    starts = 1.7e9 + 150.0 * torch.arange(epochs, dtype=torch.float64)
    lrs = 1e-2 * (1 - torch.arange(epochs, dtype=torch.float64) / epochs) ** 0.9
    return {
        "mean_fg_dice": dice.tolist(),
        "ema_fg_dice": ema.tolist(),
        "dice_per_class_or_region": per_class.clamp(max=1).tolist(),
        "train_losses": train.tolist(),
        "val_losses": (train + 0.05).tolist(),
        "lrs": lrs.tolist(),
        "epoch_start_timestamps": starts.tolist(),
        "epoch_end_timestamps": (starts + 140.0).tolist(),
    }


def write_checkpoint(folder: str | Path, fold: int, *, seed: int = 0, epochs: int = 1000,
                     trainer_name: str = "nnUNetTrainer", norm_affine_jitter: float = 0.0) -> Path:
    """Write fold_<fold>/checkpoint_final.pth for the folder's plans: a deep-supervision network with
    nnU-Net's initialisation from torch.manual_seed(seed + fold), inside the dict nnUNetTrainer
    saves. norm_affine_jitter > 0 then draws every norm's scale from 1 ± jitter and shift from
    ± jitter, as training would leave them, which also brings residual branches (zero at init) to life."""
    folder = Path(folder)
    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    torch.manual_seed(seed + fold)
    network = build_network(folder, deep_supervision=True)
    nnunet_initialise(network)
    if norm_affine_jitter:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) and module.affine:
                with torch.no_grad():
                    module.weight.uniform_(1 - norm_affine_jitter, 1 + norm_affine_jitter)
                    module.bias.uniform_(-norm_affine_jitter, norm_affine_jitter)
    # nnUNetTrainer.configure_optimizers; no step taken, so no momentum buffers (keeps fixtures small)
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    generator = torch.Generator().manual_seed(seed + fold)
    logging = _training_log(epochs, max(dataset["labels"].values()), generator)
    legacy = "architecture" not in plans["configurations"]["3d_fullres"]
    # nnUNetTrainer.__init__ keeps its arguments as init_args; 2.2 had unpack_dataset, 2.8 does not
    init_args: dict[str, Any] = {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset}
    if legacy:
        init_args["unpack_dataset"] = True
    init_args["device"] = torch.device("cuda")
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        # a CUDA GradScaler's state_dict after training (nnU-Net trains with AMP on GPUs)
        "grad_scaler_state": {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                              "growth_interval": 2000, "_growth_tracker": 1024},
        "logging": logging,
        "_best_ema": max(logging["ema_fg_dice"]),
        "current_epoch": epochs,
        "init_args": init_args,
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    path = folder / f"fold_{fold}" / "checkpoint_final.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def make_trained_model_folder(
    path: str | Path,
    *,
    seed: int = 0,
    folds: Sequence[int] = (0,),
    epochs: int = 1000,
    trainer_name: str = "nnUNetTrainer",
    norm_affine_jitter: float = 0.0,
    **plans: Any,
) -> Path:
    """An nnU-Net v2 trained-model folder: plans (see write_plans_and_dataset for the keywords), and
    one checkpoint per fold with seeded random weights (see write_checkpoint). Returns the folder."""
    folder = write_plans_and_dataset(path, **plans)
    for fold in folds:
        write_checkpoint(folder, fold, seed=seed, epochs=epochs, trainer_name=trainer_name,
                         norm_affine_jitter=norm_affine_jitter)
    return folder


def count_parameters(folder: str | Path, *, deep_supervision: bool = False) -> int:
    return sum(p.numel() for p in build_network(folder, deep_supervision=deep_supervision).parameters())


# ---- presets: keyword arguments for make_trained_model_folder -------------------------------------

FLARE_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
FLARE_KERNELS = ((1, 3, 3),) + ((3, 3, 3),) * 5
FLARE_FEATURES = (32, 64, 128, 256, 320, 320)

# Task 2 as published (DKFZ): PlainConvUNet, 6 stages, 32..320 features, 14 classes, 30.71 M parameters.
# (nnU-Net 2.8's planner at 2.5 mm isotropic would pool [1,1,1],[2,2,2]x3,[1,2,2]x2 with 3x3x3
# kernels, 30.47 M; the published count matches this anisotropic-style topology instead.)
FLARE_TASK2_PLAIN = MappingProxyType({
    "arch": "PlainConvUNet", "patch_zyx": (40, 224, 192), "spacing_zyx_mm": (2.5, 2.5, 2.5),
    "features_per_stage": FLARE_FEATURES, "strides": FLARE_STRIDES, "kernel_sizes": FLARE_KERNELS,
    "num_classes": 14, "normalization": "CTNormalization",
    "intensity": {"mean": -97.3, "std": 137.8, "percentile_00_5": -958.0, "percentile_99_5": 270.0},
})
# Task 3: the same network on MRI (z-score), patch 40x192x224 at 2.5x0.78x0.78 mm.
FLARE_TASK3_PLAIN = MappingProxyType({
    **FLARE_TASK2_PLAIN, "patch_zyx": (40, 192, 224), "spacing_zyx_mm": (2.5, 0.78, 0.78),
    "normalization": "ZScoreNormalization", "intensity": None,
})
# Task 1 as published: ResidualEncoderUNet, blocks 1,3,4,6,6,6, 2 classes, patch 96x160x160. The
# strides are what nnU-Net 2.8's planner derives for that patch and spacing (z cannot be pooled a
# fifth time: 96 / 32 < 4); with them the network has the published 101.94 M parameters.
FLARE_TASK1_RESENC = MappingProxyType({
    "arch": "ResidualEncoderUNet", "patch_zyx": (96, 160, 160), "spacing_zyx_mm": (1.0, 0.8, 0.8),
    "features_per_stage": FLARE_FEATURES, "strides": ((1, 1, 1),) + ((2, 2, 2),) * 4 + ((1, 2, 2),),
    "kernel_sizes": ((3, 3, 3),) * 6, "blocks_per_stage": (1, 3, 4, 6, 6, 6), "num_classes": 2,
    "normalization": "CTNormalization",
    "intensity": {"mean": -52.2, "std": 268.8, "percentile_00_5": -900.0, "percentile_99_5": 619.0},
})
# Tiny networks for fast tests. The 16x32x32 patch tiles the real sample CT into hundreds of
# overlapping windows, with padding on its 30-slice axis.
TINY_PLAIN = MappingProxyType({
    **FLARE_TASK2_PLAIN, "patch_zyx": (16, 32, 32), "spacing_zyx_mm": (3.0, 3.0, 3.0),
    "features_per_stage": (4, 8, 16), "strides": FLARE_STRIDES[:3], "kernel_sizes": FLARE_KERNELS[:3],
})
TINY_RESENC = MappingProxyType({
    **FLARE_TASK1_RESENC, "patch_zyx": (16, 32, 32), "spacing_zyx_mm": (2.0, 2.0, 2.0),
    "features_per_stage": (4, 8, 16), "strides": ((1, 1, 1), (2, 2, 2), (2, 2, 2)), "kernel_sizes": ((3, 3, 3),) * 3,
    "blocks_per_stage": (1, 2, 2), "convs_per_decoder_stage": (1, 1),
})
