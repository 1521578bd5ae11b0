"""models: both nnU-Net plans formats, both architectures, checkpoint loading, clear failures."""

from __future__ import annotations

import json

import pytest
import torch

from flarebox.errors import ConfigError
from flarebox.models import PLAIN_UNET, RESENC_UNET, build_network, load_network, load_plan


def legacy_configuration(unet: str) -> dict:
    """A pre-2.3 plans configuration (as nnU-Net 2.2 wrote it)."""
    return {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [32, 64, 64], "median_image_size_in_voxels": [100, 200, 200], "spacing": [2.5, 1.5, 1.5],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "UNet_class_name": unet, "UNet_base_num_features": 8, "n_conv_per_stage_encoder": [1, 2, 2, 2],
        "n_conv_per_stage_decoder": [1, 1, 1], "num_pool_per_axis": [2, 3, 3],
        "pool_op_kernel_sizes": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        "conv_kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], "unet_max_num_features": 32,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "batch_dice": False,
    }


def write_folder(folder, configuration: dict, labels=None):
    folder.mkdir(parents=True)
    plans = {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": configuration},
             "foreground_intensity_properties_per_channel": {"0": {
                 "mean": 1.0, "std": 2.0, "percentile_00_5": -1.0, "percentile_99_5": 5.0}}}
    (folder / "plans.json").write_text(json.dumps(plans))
    labels = labels or {"background": 0, "a": 1, "b": 2}
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "MRI"}}))
    return folder


@pytest.mark.parametrize(("unet", "class_name"), [("PlainConvUNet", PLAIN_UNET), ("ResidualEncoderUNet", RESENC_UNET)])
def test_legacy_plans_build_the_same_network_as_current(tmp_path, unet, class_name):
    legacy = load_plan(write_folder(tmp_path / "legacy", legacy_configuration(unet)))
    assert legacy.architecture.class_name == class_name
    assert legacy.architecture.kwargs["features_per_stage"] == [8, 16, 32, 32]
    current_cfg = {k: v for k, v in legacy_configuration(unet).items()
                   if not k.startswith(("UNet", "n_conv", "num_pool", "pool_op", "conv_kernel", "unet_max"))}
    current_cfg["architecture"] = {"network_class_name": class_name, "arch_kwargs": legacy.architecture.kwargs,
                                   "_kw_requires_import": list(legacy.architecture.requires_import)}
    current = load_plan(write_folder(tmp_path / "current", current_cfg))
    a, b = build_network(legacy).state_dict(), build_network(current).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert legacy.normalizations[0].scheme == "ZScoreNormalization"
    assert legacy.spacing_zyx_mm == (2.5, 1.5, 1.5) and legacy.patch_zyx == (32, 64, 64)
    assert legacy.num_classes == 3


def test_checkpoint_with_compile_prefix_loads(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    path = copy / "fold_0" / "checkpoint_final.pth"
    state = torch.load(path, weights_only=False)
    state["network_weights"] = {f"_orig_mod.{k}": v for k, v in state["network_weights"].items()}
    torch.save(state, path)
    plan = load_plan(copy)
    network = load_network(plan, 0)
    reference = load_network(load_plan(tiny_model_dir), 0)
    for (name, p), (_, q) in zip(network.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_bad_model_folders_fail_with_reason(tmp_path):
    with pytest.raises(ConfigError, match="not a model folder"):
        load_plan(tmp_path)
    folder = write_folder(tmp_path / "m", legacy_configuration("PlainConvUNet"))
    with pytest.raises(ConfigError, match="no configuration '2d'"):
        load_plan(folder, "2d")
    with pytest.raises(ConfigError, match="checkpoint missing"):
        load_network(load_plan(folder), 0)
    regions = write_folder(tmp_path / "r", legacy_configuration("PlainConvUNet"), {"background": 0, "x": [1, 2]})
    with pytest.raises(ConfigError, match="region-based"):
        load_plan(regions)
    unknown = write_folder(tmp_path / "u", legacy_configuration("SwinUNETR"))
    with pytest.raises(ConfigError, match="SwinUNETR"):
        load_plan(unknown)
