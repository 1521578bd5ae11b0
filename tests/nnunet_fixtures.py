"""nnU-Net v2 trained-model folders with random weights, as test fixtures.

The folders are what nnU-Net writes after training (plans.json, dataset.json,
fold_0/checkpoint_final.pth with deep supervision heads), initialised like nnU-Net does
(He normal, a = 0.01, zero biases). Presets cover the published FLARE networks and tiny ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flarebox.models import (
    Normalization,
    build_network,
    load_plan,
    save_checkpoint,
    unet_architecture,
    write_model_folder,
)

ORGANS = ["liver", "right_kidney", "spleen", "pancreas", "aorta", "inferior_vena_cava", "right_adrenal_gland",
          "left_adrenal_gland", "gallbladder", "esophagus", "stomach", "duodenum", "left_kidney"]
ORGAN_LABELS = {"background": 0, **{name: i for i, name in enumerate(ORGANS, start=1)}}
LESION_LABELS = {"background": 0, "lesion": 1}

TASK2_NORM = Normalization("CTNormalization", mean=-97.3, std=137.8, clip_low=-958.0, clip_high=270.0)
TASK1_NORM = Normalization("CTNormalization", mean=-52.2, std=268.8, clip_low=-900.0, clip_high=619.0)
ZSCORE = Normalization("ZScoreNormalization")

FLARE_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
FLARE_KERNELS = [[1, 3, 3]] + [[3, 3, 3]] * 5


def _plain(features, strides, kernels):
    return unet_architecture(residual=False, features_per_stage=features, strides=strides, kernel_sizes=kernels,
                             blocks_per_stage=[2] * len(features), convs_per_decoder_stage=[2] * (len(features) - 1))


# Task 2 as published: PlainConvUNet, 6 stages, 32..320 features, 30.71 M parameters.
FLARE_TASK2_PLAIN = {"architecture": _plain([32, 64, 128, 256, 320, 320], FLARE_STRIDES, FLARE_KERNELS),
                     "patch_zyx": (40, 224, 192), "spacing_zyx_mm": (2.5, 2.5, 2.5), "normalization": TASK2_NORM,
                     "labels": ORGAN_LABELS}
# Task 3: the same network on MRI (z-score), patch 40x192x224 at 2.5x0.78x0.78 mm.
FLARE_TASK3_PLAIN = {**FLARE_TASK2_PLAIN, "patch_zyx": (40, 192, 224), "spacing_zyx_mm": (2.5, 0.78, 0.78),
                     "normalization": ZSCORE, "channel_name": "MRI"}
# Task 1 as published: ResidualEncoderUNet, blocks 1,3,4,6,6,6, 2 classes, patch 96x160x160.
FLARE_TASK1_RESENC = {
    "architecture": unet_architecture(residual=True, features_per_stage=[32, 64, 128, 256, 320, 320],
                                      strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, kernel_sizes=[[3, 3, 3]] * 6,
                                      blocks_per_stage=[1, 3, 4, 6, 6, 6], convs_per_decoder_stage=[1] * 5),
    "patch_zyx": (96, 160, 160), "spacing_zyx_mm": (1.0, 0.8, 0.8), "normalization": TASK1_NORM,
    "labels": LESION_LABELS}

TINY_PLAIN = {"architecture": _plain([4, 8, 16], FLARE_STRIDES[:3], FLARE_KERNELS[:3]),
              "patch_zyx": (16, 32, 32), "spacing_zyx_mm": (3.0, 3.0, 3.0), "normalization": TASK2_NORM,
              "labels": ORGAN_LABELS}
TINY_RESENC = {"architecture": unet_architecture(residual=True, features_per_stage=[4, 8, 16],
                                                 strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                                                 kernel_sizes=[[3, 3, 3]] * 3, blocks_per_stage=[1, 2, 2],
                                                 convs_per_decoder_stage=[1, 1]),
               "patch_zyx": (16, 32, 32), "spacing_zyx_mm": (2.0, 2.0, 2.0), "normalization": TASK1_NORM,
               "labels": LESION_LABELS}


def he_init(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
        torch.nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def make_trained_model_folder(path: str | Path, *, seed: int = 0, folds: tuple[int, ...] = (0,), **preset) -> Path:
    """Write an nnU-Net trained-model folder for a preset, with seeded random weights per fold."""
    folder = write_model_folder(path, **preset)
    plan = load_plan(folder)
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = build_network(plan, deep_supervision=True)
        network.apply(he_init)
        save_checkpoint(network, folder / f"fold_{fold}" / "checkpoint_final.pth", fold=fold)
    return folder
