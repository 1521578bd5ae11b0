"""locate: the coarse pass's box, mapped back to the scan through strides, crop, resampling and
transposes; its safety rules; the pipeline keeping its tiles to the box."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flarebox.config import LocateConfig, from_dict
from flarebox.errors import ConfigError
from flarebox.locate import coarse_plan, decide, grow, strides_for
from flarebox.pipeline import Predictor, run_folder
from flarebox.preprocess import preprocess
from flarebox_tools.synthetic import write_image

SETTINGS = LocateConfig(mode="network", margin_mm=10.0, min_size_mm=20.0)


def _scan(shape=(90, 120, 110), cube=((30, 60), (40, 80), (20, 50))) -> np.ndarray:
    """Soft tissue inside air, and one bright cube: the 'organ' whose box the coarse pass must find."""
    image = np.full(shape, -1000, np.int16)
    image[5:-5, 10:-10, 8:-8] = 40
    image[tuple(slice(a, b) for a, b in cube)] = 300
    return image


def _coarse(image, spacing, plan):
    """What the locator does before its network: the strided view, preprocessed at the coarse plan."""
    strides = strides_for(spacing, plan)
    view = image[tuple(slice(None, None, k) for k in strides)]
    pre = preprocess(view, tuple(s * k for s, k in zip(spacing, strides, strict=True)), plan, body_threshold=-500)
    return pre, strides


def _bright(pre) -> np.ndarray:
    """Coarse 'labels' read off the preprocessed image itself: 1 where the cube is (a real threshold
    of real data, not a network's guess, so that where the box must be is known)."""
    return (pre.data[0] > pre.data[0].max() * 0.5).astype(np.uint8)


@pytest.mark.parametrize("transpose", [(0, 1, 2), (2, 0, 1)])
def test_the_box_covers_the_organ_and_little_more(tiny_plan, transpose):
    spacing, cube = (2.5, 0.8, 0.8), ((30, 60), (40, 80), (20, 50))
    image = _scan(cube=cube)
    back = tuple(int(i) for i in np.argsort(transpose))
    plan = dataclasses.replace(coarse_plan(tiny_plan, 1.0), spacing_zyx_mm=(5.0, 5.0, 5.0),
                               transpose_forward=transpose, transpose_backward=back)
    pre, strides = _coarse(image, spacing, plan)
    located = decide(_bright(pre), pre, strides, image.shape, spacing, SETTINGS)
    assert located.box is not None, located.note
    coarse_mm = 5.0
    for (lo, hi), (c0, c1), s in zip(located.box, cube, spacing, strict=True):
        assert lo <= c0 and hi >= c1  # the whole organ is inside
        slack = (SETTINGS.margin_mm + 2 * coarse_mm) / s  # margin plus the coarse grid's rounding
        assert c0 - lo <= slack + 1 and hi - c1 <= slack + 1
    assert "box z" in located.note and "% of the scan" in located.note


def test_a_z_only_box_keeps_whole_slices(tiny_plan):
    """axes = "z" (a 2.5D network's): the same slices as the full box, every row and column of them."""
    spacing, cube = (2.5, 0.8, 0.8), ((30, 60), (40, 80), (20, 50))
    image = _scan(cube=cube)
    plan = dataclasses.replace(coarse_plan(tiny_plan, 1.0), spacing_zyx_mm=(5.0, 5.0, 5.0))
    pre, strides = _coarse(image, spacing, plan)
    full = decide(_bright(pre), pre, strides, image.shape, spacing, SETTINGS)
    slices = decide(_bright(pre), pre, strides, image.shape, spacing, dataclasses.replace(SETTINGS, axes="z"))
    assert slices.box == (full.box[0], (0, image.shape[1]), (0, image.shape[2]))
    assert full.box[1] != (0, image.shape[1])  # the full box did crop in-plane


def test_a_box_near_the_edge_grows_to_it(tiny_plan):
    spacing, cube = (2.5, 0.8, 0.8), ((0, 30), (40, 80), (20, 50))  # the scan cuts the organ at its first slice
    image = _scan(cube=cube)
    plan = coarse_plan(dataclasses.replace(tiny_plan, spacing_zyx_mm=(1.0, 1.0, 1.0)), 5.0)
    pre, strides = _coarse(image, spacing, plan)
    located = decide(_bright(pre), pre, strides, image.shape, spacing, SETTINGS)
    assert located.box is not None and located.box[0][0] == 0
    assert grow(((3, 50),), (90,), (2.5,), 0.0, (2,))[0] == (3, 50)
    assert grow(((2, 88),), (90,), (2.5,), 0.0, (2,))[0] == (0, 90)  # within one coarse voxel of both ends
    assert grow(((10, 50),), (90,), (2.5,), 10.0, (2,))[0] == (6, 54)  # 10 mm = 4 slices of 2.5 mm


def test_no_organ_or_an_implausible_box_keeps_the_whole_scan(tiny_plan):
    spacing = (2.5, 0.8, 0.8)
    image = _scan()
    plan = coarse_plan(dataclasses.replace(tiny_plan, spacing_zyx_mm=(1.0, 1.0, 1.0)), 5.0)
    pre, strides = _coarse(image, spacing, plan)
    empty = decide(np.zeros(pre.data.shape[1:], np.uint8), pre, strides, image.shape, spacing, SETTINGS)
    assert empty.box is None and "found no organ" in empty.note
    speck = np.zeros(pre.data.shape[1:], np.uint8)
    speck[5, 5, 5] = 3  # one coarse voxel: 5 mm, under min_size_mm
    small = decide(speck, pre, strides, image.shape, spacing, SETTINGS)
    assert small.box is None and "smaller than 20 mm" in small.note


def test_a_stray_blob_does_not_stretch_the_box(tiny_plan):
    spacing = (2.5, 0.8, 0.8)
    image = _scan()
    plan = coarse_plan(dataclasses.replace(tiny_plan, spacing_zyx_mm=(1.0, 1.0, 1.0)), 5.0)
    pre, strides = _coarse(image, spacing, plan)
    labels = _bright(pre)
    clean = decide(labels, pre, strides, image.shape, spacing, SETTINGS)
    labels[-1, -1, -1] = 1  # one voxel of the same label in the far corner
    assert decide(labels, pre, strides, image.shape, spacing, SETTINGS).box == clean.box
    named = dataclasses.replace(SETTINGS, labels=(2,))  # only label 2 counts, and there is none
    assert decide(labels, pre, strides, image.shape, spacing, named).box is None


def test_preprocessing_a_box_is_preprocessing_the_cropped_scan(tiny_plan):
    image = _scan()
    roi = ((10, 70), (20, 100), (15, 90))
    spacing = (2.5, 0.8, 0.8)
    whole = preprocess(image, spacing, tiny_plan, body_threshold=-500, roi_zyx=roi)
    cropped = preprocess(image[tuple(slice(a, b) for a, b in roi)], spacing, tiny_plan, body_threshold=-500)
    np.testing.assert_array_equal(whole.data, cropped.data)
    assert whole.shape_before_crop == image.shape
    assert whole.bbox == tuple((a + r, b + r) for (a, b), (r, _) in zip(cropped.bbox, roi, strict=True))


def _config(model: Path, locator: Path, **locate):
    return from_dict({"model": {"folder": str(model)}, "inference": {"precision": "f32", "fit_patch": True},
                      "preprocess": {"body_threshold": -500},
                      "locate": {"mode": "network", "folder": str(locator), "min_size_mm": 0, **locate}}, Path.cwd())


def test_the_pipeline_keeps_its_labels_to_the_box_and_says_so(tiny_model_dir, tmp_path, caplog):
    image = _scan(shape=(40, 96, 88), cube=((10, 30), (30, 60), (20, 50)))
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_image(in_dir / "case_0000.nii.gz", image, spacing_xyz=(2.0, 2.0, 4.0))
    predictor = Predictor.from_config(_config(tiny_model_dir, tiny_model_dir, margin_mm=0))
    volume_spacing = (4.0, 2.0, 2.0)
    located = predictor.locator.locate(image, volume_spacing)
    with caplog.at_level(logging.INFO, logger="flarebox"):
        assert run_folder(predictor, in_dir, out_dir) == 0
    line = next(r.getMessage() for r in caplog.records if "case:" in r.getMessage())
    assert "locate" in line and located.note in line
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / "case.nii.gz")))
    if located.box is not None:  # random weights: some box, or none, but never labels outside it
        outside = np.ones(labels.shape, bool)
        outside[tuple(slice(a, b) for a, b in located.box)] = False
        assert not labels[outside].any()


def test_locate_settings_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"\[locate\] mode"):
        from_dict({"locate": {"mode": "guess"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"\[locate\] folder"):
        from_dict({"locate": {"mode": "network"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"\[locate\] coarsen"):
        from_dict({"locate": {"mode": "model", "coarsen": 0.5}}, tmp_path)
    config = from_dict({"model": {"folder": str(tiny_model_dir)}, "locate": {"mode": "model", "labels": [1, 2]}},
                       tmp_path)
    predictor = Predictor.from_config(config)
    assert predictor.locator.backend is predictor.backend  # the organ model itself, coarsened
    assert predictor.locator.plan.spacing_zyx_mm == tuple(2 * s for s in predictor.plan.spacing_zyx_mm)
    assert predictor.locator.settings.labels == (1, 2)


def test_a_locator_trains_for_a_users_dataset_and_runs(tmp_path, tiny_model_dir):
    """`flarebox-tools locator` on a small organ dataset, run as a user runs it (its own process: a
    torch training in the test process, after OpenVINO, left this Xeon's torch to crash a later
    test): a model folder with its OpenVINO IR that the engine takes as [locate] folder."""
    import subprocess
    import sys

    from flarebox_tools import phantoms

    raw = phantoms.write_dataset(tmp_path / "raw", 4, 0, label_set="organs", spacing_scale=3.0)
    out = tmp_path / "locator"
    run = subprocess.run([sys.executable, "-m", "flarebox_tools.cli", "locator", "--dataset", str(raw), "--out",
                          str(out), "--epochs", "1"], capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (out / "openvino" / "fold_0_f32.xml").is_file() and (out / "fold_0" / "checkpoint_final.pth").is_file()
    predictor = Predictor.from_config(_config(tiny_model_dir, out))
    assert predictor.locator.plan.spacing_zyx_mm == (5.0, 5.0, 5.0)
    image = _scan()
    located = predictor.locator.locate(image, (2.5, 0.8, 0.8))
    assert located.note  # a box or the whole scan, with its reason


def test_a_locator_folder_with_its_ir_alone_runs(tiny_model_dir, tmp_path):
    """The CPU image carries a locator's plans, dataset and IR, no checkpoint: its folds come from
    the IR files (a plan without folds once ran no network at all and failed every case)."""
    import shutil

    ir_only = tmp_path / "locator"
    ir_only.mkdir()
    for name in ("plans.json", "dataset.json"):
        shutil.copy(tiny_model_dir / name, ir_only / name)
    shutil.copytree(tiny_model_dir / "openvino", ir_only / "openvino")
    predictor = Predictor.from_config(_config(tiny_model_dir, ir_only))
    assert predictor.locator.plan.folds == (0,)
    labels, _, _ = predictor.locator.coarse_labels(_scan(), (2.5, 0.8, 0.8))
    assert labels.ndim == 3
