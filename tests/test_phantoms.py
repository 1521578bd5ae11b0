"""phantoms: determinism, anatomy in patient coordinates, plausible intensities, nnU-Net raw output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from flarebox.phantoms import ORGAN_LABELS, generate_case, generate_patient_sequences, write_dataset

COARSE = (3.0, 2.5, 2.5)


def world_centroid(phantom, label):
    """Centroid of a label in patient (LPS) millimetres, through the phantom's own geometry."""
    k, j, i = np.nonzero(phantom.organs_zyx == label)
    index = np.stack([i, j, k]).mean(axis=1)
    direction = np.asarray(phantom.direction).reshape(3, 3)
    return np.asarray(phantom.origin_xyz_mm) + direction @ (index * np.asarray(phantom.spacing_zyx_mm[::-1]))


def test_same_seed_same_case_other_seed_other_case():
    a, b = generate_case(3, spacing_zyx_mm=COARSE), generate_case(3, spacing_zyx_mm=COARSE)
    assert np.array_equal(a.image_zyx, b.image_zyx) and np.array_equal(a.organs_zyx, b.organs_zyx)
    assert not np.array_equal(a.image_zyx.shape, generate_case(4, spacing_zyx_mm=COARSE).image_zyx.shape) or \
        not np.array_equal(a.image_zyx, generate_case(4, spacing_zyx_mm=COARSE).image_zyx)


@pytest.mark.parametrize("orientation", ["lps", "ras", "oblique"])
def test_anatomy_sits_where_it_should_in_patient_space(orientation):
    p = generate_case(11, orientation=orientation, spacing_zyx_mm=COARSE)
    assert set(np.unique(p.organs_zyx)) >= set(range(1, 14)) - {10}  # esophagus may be above the FOV
    liver, spleen = world_centroid(p, 1), world_centroid(p, 3)
    right_kidney, left_kidney = world_centroid(p, 2), world_centroid(p, 13)
    aorta = world_centroid(p, 5)
    # LPS: +x is the patient's left, +y posterior
    assert liver[0] < 0 < spleen[0]
    assert right_kidney[0] < 0 < left_kidney[0]
    assert right_kidney[1] > liver[1] and left_kidney[1] > spleen[1] - 20  # kidneys lie posterior
    assert aorta[0] > world_centroid(p, 6)[0]  # the IVC is right of the aorta


def test_ct_intensities_and_grid_ranges():
    for seed in range(3):
        p = generate_case(seed, spacing_zyx_mm=None, spacing_scale=2.0)
        assert p.image_zyx.dtype == np.int16
        assert np.percentile(p.image_zyx, 1) < -900  # air around the body
        liver = p.image_zyx[p.organs_zyx == 1]
        assert 20 < np.median(liver) < 170
        sz, sy, sx = p.spacing_zyx_mm
        assert 1.2 <= sx == sy <= 2.0 and 2.0 <= sz <= 10.0  # 0.6-1 mm and 1-5 mm, doubled here


def test_mri_sequences_share_anatomy_without_hounsfield_units():
    seqs = generate_patient_sequences(5, spacing_scale=3.0)
    t1, t2 = seqs["t1"], seqs["t2"]
    assert t1.image_zyx.dtype == np.float32 and t1.image_zyx.min() >= 0
    assert not np.allclose(t1.origin_xyz_mm, t2.origin_xyz_mm)  # slightly misaligned acquisitions
    assert abs(world_centroid(t1, 1) - world_centroid(t2, 1)).max() < 15
    # different contrasts: spleen darker than liver on T1, brighter on T2
    ratio = lambda p: np.median(p.image_zyx[p.organs_zyx == 3]) / np.median(p.image_zyx[p.organs_zyx == 1])  # noqa: E731
    assert ratio(t2) > 1.5 * ratio(t1)


def test_template_anatomy_deforms_the_real_label_map():
    p = generate_case(2, anatomy="template")
    assert p.organs_zyx.shape == (30, 101, 122)
    assert set(np.unique(p.organs_zyx)) >= {1, 2, 3, 5, 13}


def test_write_dataset_in_nnunet_raw_format(tmp_path):
    out = write_dataset(tmp_path / "raw", 2, 7, spacing_zyx_mm=COARSE)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == ORGAN_LABELS and dataset["numTraining"] == 2
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    for case in ("phantom_0007", "phantom_0008"):
        image = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        assert image.GetSize() == label.GetSize() and image.GetDirection() == label.GetDirection()
        assert np.allclose(image.GetOrigin(), label.GetOrigin()) and label.GetPixelID() == sitk.sitkUInt8
