"""Shared fixtures: tiny nnU-Net model folders with random weights, converted to OpenVINO once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flarebox.models import load_plan
from flarebox_tools import nnunet_folders
from flarebox_tools.synthetic import ct_like, write_image

# The real CT (../shared/data/real) is bundled as the sample input; its labels stay in shared/.
REAL_CT = Path(__file__).resolve().parent / "data" / "inputs" / "ts_ct_sm_0000.nii.gz"
# the tiny network of the training tests, as a TOML [network] table (the CLI's form)
TINY_NETWORK_TOML = """
[network]
features_per_stage = [4, 8, 16]
strides_zyx = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
kernel_sizes_zyx = [[3, 3, 3], [3, 3, 3], [3, 3, 3]]
blocks_per_stage = [1, 1, 1]
spacing_zyx_mm = [8.0, 8.0, 8.0]
patch_zyx = [16, 32, 32]
ct_clip_hu = [-958, 270]
ct_mean_hu = -97.3
ct_std_hu = 137.8
"""
REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ts_ct_sm.nii.gz"


@pytest.fixture(scope="session")
def tiny_torch_model_dir(tmp_path_factory) -> Path:
    """A tiny PlainConvUNet (14 classes, CT normalisation) as nnU-Net writes it."""
    return nnunet_folders.make_trained_model_folder(tmp_path_factory.mktemp("models") / "tiny",
                                                     **nnunet_folders.TINY_PLAIN)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_torch_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its OpenVINO f32 and INT8 IR added."""
    from flarebox_tools.convert import convert_model

    folder = tiny_torch_model_dir
    calib = tmp_path_factory.mktemp("calib")
    images = [write_image(calib / f"c{i}_0000.nii.gz", ct_like((24, 48, 40), seed=i), spacing_xyz=(2, 2, 3))
              for i in range(2)]
    convert_model(folder, calibration_images=images, tiles_per_image=2)
    return folder


@pytest.fixture(scope="session")
def tiny_plan(tiny_model_dir):
    return load_plan(tiny_model_dir)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def make_bad_folder(folder: Path) -> None:
    folder.mkdir()
    good = write_image(folder / "good_0000.nii.gz", ct_like((12, 40, 36)), spacing_xyz=(2, 2, 3))
    data = good.read_bytes()
    (folder / "corrupt_0000.nii.gz").write_bytes(data[:200] + bytes(b ^ 0x5A for b in data[200:400]) + data[400:])
    (folder / "truncated_0000.nii.gz").write_bytes(data[: len(data) // 2])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 30), np.int16)), str(folder / "flat_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 8, 8, 8), np.int16), isVector=False),
                    str(folder / "fourd_0000.nii.gz"))
    nan = ct_like((12, 40, 36)).astype(np.float32)
    nan[5, 5, 5] = np.nan
    write_image(folder / "nan_0000.nii.gz", nan)
    (folder / "notes_0000.nii.gz").write_text("a text file with the right name")
    (folder / "readme.txt").write_text("not an image")
