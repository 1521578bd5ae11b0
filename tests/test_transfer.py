"""training.transfer: MRI naming, the organ-complete filter, affine registration recovering a known
patient motion, and the six-step pipeline end to end on tiny phantoms (rerun: every step skipped;
one step's marker removed: that step alone redone)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flarebox.errors import CaseError
from flarebox_tools.training.config import NetworkSpec, TrainConfig
from flarebox_tools.training.transfer import (
    TransferConfig,
    carry_labels,
    list_mri,
    organs_present,
    register_affine,
    run,
    select_complete,
)
from flarebox_tools.training.transfer_demo import in_scanner_frame, write_mri_patients

TINY = NetworkSpec(features_per_stage=(4, 8, 16), strides_zyx=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                   kernel_sizes_zyx=((3, 3, 3),) * 3, blocks_per_stage=(1, 1, 1), spacing_zyx_mm=(8.0, 8.0, 8.0),
                   patch_zyx=(16, 32, 32), normalization="ZScoreNormalization")


def test_mri_names_give_patient_and_sequence_and_a_bad_name_is_named(tmp_path):
    for name in ("amos_0507_t1_0000.nii.gz", "amos_0507_T2_0000.nii.gz", "p1_dixonin_0000.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    images = list_mri(tmp_path)
    assert sorted((i.patient, i.sequence) for i in images) == [("amos_0507", "t1"), ("amos_0507", "t2"),
                                                               ("p1", "dixonin")]
    (tmp_path / "scan_0000.nii.gz").write_bytes(b"")
    with pytest.raises(CaseError, match="scan_0000.nii.gz: not named <patient>_<sequence>_0000"):
        list_mri(tmp_path)


def test_organ_complete_filter_counts_organs_with_enough_voxels():
    labels = np.zeros((10, 20, 20), np.uint8)
    for organ in range(1, 14):
        labels[organ - 1 if organ < 10 else 9, organ, :] = organ  # 20 voxels each
    assert organs_present(labels, 20) == list(range(1, 14))
    labels[9, 13, 5:] = 0  # left kidney down to 5 voxels: noise, not an organ
    assert organs_present(labels, 20) == list(range(1, 13))
    counts = {"a": 13, "b": 12, "c": 9, "d": 12}
    assert select_complete(counts, 13) == ["a"] and select_complete(counts, 10) == ["a", "b", "d"]
    # the relaxation: too few pass, so the most complete ones are kept (ties by case id)
    assert select_complete(counts, 13, min_selected=2) == ["a", "b"]
    assert select_complete(counts, 13, min_selected=1) == ["a"]  # enough passed: the rule alone
    assert select_complete({"x": 3, "y": 5}, 13, min_selected=1) == ["y"]


def test_registration_recovers_a_known_patient_motion():
    from flarebox_tools.phantoms import generate_patient_sequences

    moved = generate_patient_sequences(7, ("t1", "t2"), spacing_zyx_mm=(4.0, 3.0, 3.0), max_shift_mm=6.0,
                                       max_rotation_deg=4.0)
    t1, t2 = moved["t1"], moved["t2"]
    # truth: a point p of the T2 as written in the T1's frame shows anatomy at R (p - o1) + o2 in the T1
    rotation = np.asarray(t2.direction).reshape(3, 3) @ np.linalg.inv(np.asarray(t1.direction).reshape(3, 3))
    o1, o2 = np.asarray(t1.origin_xyz_mm), np.asarray(t2.origin_xyz_mm)
    framed = in_scanner_frame(moved)

    def image(phantom, array):
        out = sitk.GetImageFromArray(np.ascontiguousarray(array))
        out.SetSpacing(phantom.spacing_zyx_mm[::-1])
        out.SetOrigin(phantom.origin_xyz_mm)
        out.SetDirection(phantom.direction)
        return out

    fixed, moving = image(framed["t2"], framed["t2"].image_zyx), image(framed["t1"], framed["t1"].image_zyx)
    transform = register_affine(fixed, moving)
    organs = np.argwhere(framed["t2"].organs_zyx > 0)[::500]  # voxels inside organs, (z, y, x)
    errors, before = [], []
    for z, y, x in organs:
        p = np.asarray(fixed.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
        true = rotation @ (p - o1) + o2
        errors.append(np.linalg.norm(np.asarray(transform.TransformPoint(p.tolist())) - true))
        before.append(np.linalg.norm(p - true))
    assert np.mean(before) > 3.0  # the motion is there: several mm
    # recovered to about half a voxel (3 mm in-plane) on average: ITK's multi-threaded metric sums
    # in a CPU-dependent order, and the same run ends at 1.4-1.6 mm on different CPUs
    assert np.mean(errors) < 2.0 and np.max(errors) < 3.0

    labels_t1 = image(framed["t1"], framed["t1"].organs_zyx)
    carried = sitk.GetArrayFromImage(carry_labels(labels_t1, fixed, transform))
    plain = sitk.GetArrayFromImage(carry_labels(labels_t1, fixed, sitk.Transform()))
    truth = framed["t2"].organs_zyx

    def dice(a, b):
        return 2 * np.sum((a == b) & (b > 0)) / (np.sum(a > 0) + np.sum(b > 0))

    assert dice(carried, truth) > 0.85 and dice(carried, truth) > dice(plain, truth) + 0.05


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from flarebox_tools.phantoms import write_dataset

    root = tmp_path_factory.mktemp("transfer")
    ct = write_dataset(root / "ct", 3, 0, spacing_zyx_mm=(6.0, 6.0, 6.0))
    write_mri_patients(root / "mri", root / "truth", 2, 100, spacing_scale=3.0)
    train = TrainConfig(epochs=2, iterations_per_epoch=2, batch_size=2, validation_cases=1, validate_every_epochs=2,
                        device="cpu", optimizer="adamw", learning_rate=3e-3)
    # min_organs 0: a network trained for 4 steps may find no organ at all; the rule itself is tested above
    config = TransferConfig(train=train, network=TINY, min_organs=0, min_organ_voxels=1, device="cpu")
    final = run(ct, root / "mri", root / "work", config, root / "truth")
    return root, config, final


def test_pipeline_writes_every_step_and_a_final_model_for_mri(pipeline_run):
    from flarebox.models import load_plan

    root, _, final = pipeline_run
    work = root / "work"
    for step in ("1_mind_model", "2_pseudo_t1", "3_selected", "4_t1_model", "5_carried_labels", "6_final_model"):
        assert (work / f"{step}.done.json").is_file()
    assert load_plan(work / "1_mind_model").input_features == "mind"
    plan = load_plan(final)
    assert plan.input_features == "intensity" and plan.normalizations[0].scheme == "ZScoreNormalization"
    assert not (final / "fold_0" / "checkpoint_latest.pth").exists()
    assert sorted(p.name for p in (work / "2_pseudo_t1").glob("*.nii.gz")) == ["mri0100_t1.nii.gz",
                                                                              "mri0101_t1.nii.gz"]
    assert sorted(p.name for p in (work / "5_carried_labels").glob("*.nii.gz")) == ["mri0100_t2.nii.gz",
                                                                                   "mri0101_t2.nii.gz"]
    carried = sitk.ReadImage(str(work / "5_carried_labels" / "mri0100_t2.nii.gz"))
    target = sitk.ReadImage(str(root / "mri" / "mri0100_t2_0000.nii.gz"))
    assert carried.GetSize() == target.GetSize() and carried.GetOrigin() == target.GetOrigin()
    images = sorted(p.name for p in (work / "6_final_dataset" / "imagesTr").iterdir())
    assert len(images) == 3 + 4 and sum(n.startswith("mri_") for n in images) == 4
    selected = json.loads((work / "3_selected.json").read_text())
    assert selected["of"] == 2 and selected["rule"]["relaxed"] is True
    quality = json.loads((work / "quality.json").read_text())
    assert {"2_pseudo_t1", "4_t1_labels", "5_carried_labels"} <= set(quality)
    assert quality["5_carried_labels"]["mean"]["cases"] == 2


def test_a_rerun_skips_done_steps_and_redoes_only_an_unfinished_one(pipeline_run, caplog):
    root, config, final = pipeline_run
    work = root / "work"
    mind_checkpoint = work / "1_mind_model" / "fold_0" / "checkpoint_final.pth"
    stamp = mind_checkpoint.stat().st_mtime_ns
    carried = work / "5_carried_labels" / "mri0100_t2.nii.gz"
    (work / "5_carried_labels.done.json").unlink()
    carried.unlink()
    with caplog.at_level(logging.INFO, logger="flarebox_tools.training"):
        run(root / "ct", root / "mri", work, config, root / "truth")
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 5 and not any("5_carried_labels" in m for m in skipped)
    assert carried.is_file() and mind_checkpoint.stat().st_mtime_ns == stamp
    assert any("mri0100_t2 <- mri0100_t1: registered" in r.getMessage() for r in caplog.records)
    assert not any("mri0101_t2 <- " in r.getMessage() for r in caplog.records)  # its output was still there


# ---- the task folder ---------------------------------------------------------------------------------

TASK3 = Path(__file__).resolve().parents[1] / "task3_mri_transfer"


@pytest.mark.parametrize("config_name, features", [("config.toml", "intensity"), ("config_zero_shot.toml", "mind")])
def test_task3_predict_sh_runs_both_modes_on_an_mri(config_name, features, tmp_path):
    """predict.sh (dash) with the shipped demo weights: the final model, and the zero-shot MIND model."""
    from flarebox.config import load_config
    from flarebox.models import load_plan
    from flarebox_tools.phantoms import generate_case, write_case

    config = load_config(TASK3 / config_name)
    assert config.preprocess.features == features and config.inference.backend == "torch"
    assert config.inference.device == "auto" and config.inference.precision == "fp16"
    assert load_plan(config.model.folder).input_features == features
    in_dir = tmp_path / "in"
    write_case(generate_case(11, modality="t2", spacing_zyx_mm=(6.0, 2.5, 2.5)), in_dir, None, "mri_0011")
    env = {**os.environ, "INPUT_DIR": str(in_dir), "OUTPUT_DIR": str(tmp_path / "out"), "CONFIG": config_name,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["dash" if shutil.which("dash") else "sh", str(TASK3 / "predict.sh")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.listdir(tmp_path / "out") == ["mri_0011.nii.gz"] and os.listdir(in_dir) == ["mri_0011_0000.nii.gz"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "mri_0011.nii.gz")))
    assert labels.dtype == np.uint8 and labels.max() <= 13 and labels.shape == (
        sitk.GetArrayFromImage(sitk.ReadImage(str(in_dir / "mri_0011_0000.nii.gz"))).shape)
