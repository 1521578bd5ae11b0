"""A new model folder from a NetworkSpec: plans.json and dataset.json in nnU-Net v2's current format.

The files are written by `flarebox.models.write_model_folder` (the keys nnU-Net 2.8.1's
ExperimentPlanner writes for a `3d_fullres` configuration, with an `architecture` entry), so the
engine, `nnUNetv2_predict` and this trainer all read the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from flarebox.errors import ConfigError
from flarebox.mind import CHANNEL_NAMES as MIND_CHANNEL_NAMES
from flarebox.models import Normalization, unet_architecture, write_model_folder
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
