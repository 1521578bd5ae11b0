"""A new model folder from a NetworkSpec: plans.json and dataset.json in nnU-Net v2's current format.

The files are written by `write_model_folder` (the keys nnU-Net 2.8.1's
ExperimentPlanner writes for a `3d_fullres` configuration, with an `architecture` entry), so the
engine, `nnUNetv2_predict` and this trainer all read the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flarebox.errors import ConfigError
from flarebox.mind import CHANNEL_NAMES as MIND_CHANNEL_NAMES
from flarebox.models import LIGHT_UNET, PLAIN_UNET, RESENC_UNET, Architecture, Normalization
from flarebox_tools.training.config import NetworkSpec


def normalization_of(spec: NetworkSpec) -> Normalization:
    if spec.normalization == "CTNormalization":
        low, high = spec.ct_clip_hu
        return Normalization("CTNormalization", spec.ct_mean_hu, spec.ct_std_hu, low, high)
    return Normalization(spec.normalization)


def write_plans(
    folder: str | Path,
    spec: NetworkSpec,
    labels: dict[str, int],
    *,
    channel_name: str = "CT",
    dataset_name: str = "Dataset900_Flarebox",
    num_training: int = 0,
) -> Path:
    """Write `folder/plans.json` and `folder/dataset.json` for `spec` and the dataset's labels."""
    if spec.kind == "light":
        architecture = light_architecture(spec)
    else:
        architecture = unet_architecture(
            residual=spec.residual,
            features_per_stage=list(spec.features_per_stage),
            strides=[list(s) for s in spec.strides_zyx],
            kernel_sizes=[list(k) for k in spec.kernel_sizes_zyx],
            blocks_per_stage=list(spec.blocks_per_stage),
            convs_per_decoder_stage=list(spec.decoder_convs),
        )
    return write_model_folder(
        folder,
        architecture=architecture,
        patch_zyx=spec.patch_zyx,
        spacing_zyx_mm=spec.spacing_zyx_mm,
        normalization=normalization_of(spec),
        labels=labels,
        channel_name=channel_name,
        dataset_name=dataset_name,
        batch_size=spec.batch_size,
        num_training=num_training,
        channel_names=MIND_CHANNEL_NAMES if spec.input_features == "mind" else None,
    )


def dataset_labels(dataset_dir: str | Path) -> tuple[dict[str, int], str]:
    """The label map and first channel name of an nnU-Net raw dataset's dataset.json."""
    path = Path(dataset_dir) / "dataset.json"
    try:
        dataset = json.loads(path.read_text())
        labels = {str(k): int(v) for k, v in dataset["labels"].items()}
        channels = dataset.get("channel_names", dataset.get("modality", {"0": "CT"}))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not an nnU-Net raw dataset.json ({exc})") from exc
    return labels, str(channels.get("0", "CT"))


def light_architecture(spec: NetworkSpec) -> Architecture:
    """The `architecture` entry of the lightweight 2.5D network (flarebox.networks.LightUNet)."""
    kwargs: dict[str, Any] = {
        "slices": spec.slices,
        "features_per_stage": list(spec.features_per_stage),
        "strides": [list(s[1:]) for s in spec.strides_zyx],
        "convs_per_stage": spec.blocks_per_stage[0],
        "norm_groups": spec.norm_groups,
    }
    return Architecture(LIGHT_UNET, kwargs, ())


def unet_architecture(
    *,
    residual: bool,
    features_per_stage: list[int],
    strides: list[list[int]],
    kernel_sizes: list[list[int]],
    blocks_per_stage: list[int],
    convs_per_decoder_stage: list[int],
) -> Architecture:
    """The `architecture` entry nnU-Net v2 plans for a PlainConvUNet or ResidualEncoderUNet."""
    kwargs: dict[str, Any] = {
        "n_stages": len(features_per_stage),
        "features_per_stage": list(features_per_stage),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in kernel_sizes],
        "strides": [list(s) for s in strides],
        ("n_blocks_per_stage" if residual else "n_conv_per_stage"): list(blocks_per_stage),
        "n_conv_per_stage_decoder": list(convs_per_decoder_stage),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return Architecture(RESENC_UNET if residual else PLAIN_UNET, kwargs, ("conv_op", "norm_op", "dropout_op", "nonlin"))


def write_model_folder(
    folder: str | Path,
    *,
    architecture: Architecture,
    patch_zyx: tuple[int, int, int],
    spacing_zyx_mm: tuple[float, float, float],
    normalization: Normalization,
    labels: dict[str, int],
    channel_name: str = "CT",
    dataset_name: str = "Dataset001_Flarebox",
    batch_size: int = 2,
    num_training: int = 0,
    channel_names: tuple[str, ...] | None = None,
) -> Path:
    """Write plans.json and dataset.json exactly as nnU-Net v2 (current format) writes them for a
    `3d_fullres` configuration, so nnU-Net's own predictor and ours read the same folder.

    channel_names: several input channels (e.g. MIND-SSC's 12), all with `normalization`; default
    one channel named `channel_name`."""
    channel_names = channel_names or (channel_name,)
    n_channels = len(channel_names)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    properties = {"0": {"max": normalization.clip_high, "mean": normalization.mean, "median": normalization.mean,
                        "min": normalization.clip_low, "percentile_00_5": normalization.clip_low,
                        "percentile_99_5": normalization.clip_high, "std": normalization.std}}
    plans = {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing_zyx_mm),
        "original_median_shape_after_transp": list(patch_zyx),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": batch_size,
                "patch_size": list(patch_zyx),
                "median_image_size_in_voxels": list(patch_zyx),
                "spacing": list(spacing_zyx_mm),
                "normalization_schemes": [normalization.scheme] * n_channels,
                "use_mask_for_norm": [False] * n_channels,
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": data_kwargs,
                "resampling_fn_seg_kwargs": {**data_kwargs, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**data_kwargs, "order": 1},
                "architecture": {
                    "network_class_name": architecture.class_name,
                    "arch_kwargs": architecture.kwargs,
                    "_kw_requires_import": list(architecture.requires_import),
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": properties if normalization.scheme == "CTNormalization" else {},
    }
    dataset = {"channel_names": {str(i): name for i, name in enumerate(channel_names)}, "labels": labels,
               "numTraining": num_training, "file_ending": ".nii.gz"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=4) + "\n")
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    return folder
