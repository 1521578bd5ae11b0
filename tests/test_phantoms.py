"""phantoms: determinism, anatomy in patient coordinates, intensities, geometry on disk, datasets."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from flarebox_tools import phantoms
from flarebox_tools.metrics import ORGAN_NAMES
from flarebox_tools.phantoms import (
    ORGAN_LABELS,
    PHASES,
    generate_case,
    generate_patient_sequences,
    random_grid,
    write_case,
    write_dataset,
)

COARSE = (5.0, 2.5, 2.5)  # small grids keep each case well under a second
TALL = (70, 170, 170)  # 350 mm: from above the domes to below the kidneys
LABEL = {name: label for label, name in enumerate(ORGAN_NAMES, start=1)}


def centroids_world_lps(path) -> dict[str, np.ndarray]:
    """Organ centroids in SimpleITK's world (LPS mm) from a written label file."""
    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayFromImage(image)
    out = {}
    for name, label in LABEL.items():
        zyx = np.argwhere(labels == label)
        if len(zyx):
            out[name] = np.array(image.TransformContinuousIndexToPhysicalPoint(zyx.mean(0)[::-1].tolist()))
    return out


def test_same_seed_same_case_other_seed_other_case():
    a, b = (generate_case(7, spacing_zyx_mm=COARSE) for _ in range(2))
    for field in ("image_zyx", "organs_zyx", "lesions_zyx"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.spacing_zyx_mm, a.origin_xyz_mm, a.direction, a.phase) == (b.spacing_zyx_mm, b.origin_xyz_mm,
                                                                         b.direction, b.phase)
    c = generate_case(8, spacing_zyx_mm=COARSE)
    assert a.image_zyx.shape != c.image_zyx.shape or not np.array_equal(a.image_zyx, c.image_zyx)
    assert a.origin_xyz_mm != c.origin_xyz_mm


@pytest.mark.parametrize("seed", range(3))
def test_all_13_organs_in_a_tall_field_of_view(seed):
    p = generate_case(seed, spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation="lps")
    assert set(np.unique(p.organs_zyx)) == set(range(14))
    volumes_ml = ndimage.sum_labels(np.ones_like(p.organs_zyx), p.organs_zyx, range(1, 14)) * np.prod(COARSE) / 1000
    liver, right_kidney, spleen, adrenal = volumes_ml[0], volumes_ml[1], volumes_ml[2], volumes_ml[6]
    assert 700 < liver < 3000 and 60 < right_kidney < 300 and 50 < spleen < 600 and 1 < adrenal < 20, volumes_ml


@pytest.mark.parametrize("orientation", ["lps", "ras", "oblique"])
def test_left_and_right_in_patient_coordinates(tmp_path, orientation):
    """Written, read back and placed in the world by SimpleITK (LPS: x grows to the patient's left)
    and by nibabel (RAS: x grows to the right), organs sit on their anatomical sides."""
    p = generate_case(3, spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation=orientation)
    if orientation == "ras":
        assert p.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    write_case(p, tmp_path, tmp_path, "case")
    lps = centroids_world_lps(tmp_path / "case.nii.gz")
    assert lps["liver"][0] < lps["aorta"][0] < lps["spleen"][0]  # patient's right is -x in LPS
    assert lps["right_kidney"][0] < 0 < lps["left_kidney"][0] + 40
    assert lps["right_kidney"][0] < lps["left_kidney"][0]
    assert lps["right_adrenal_gland"][0] < lps["left_adrenal_gland"][0]
    assert lps["inferior_vena_cava"][0] < lps["aorta"][0]  # IVC right of the aorta
    assert lps["gallbladder"][0] < 0 and lps["stomach"][0] > 0
    assert lps["aorta"][1] < lps["right_kidney"][1] and lps["aorta"][1] < lps["left_kidney"][1]  # kidneys behind
    assert lps["gallbladder"][1] < lps["inferior_vena_cava"][1]  # gallbladder in front
    assert lps["liver"][2] > lps["right_kidney"][2] and lps["right_adrenal_gland"][2] > lps["right_kidney"][2]
    assert lps["esophagus"][2] > lps["pancreas"][2]
    image = nibabel.load(str(tmp_path / "case.nii.gz"))
    labels = np.asarray(image.dataobj)
    ras = {n: nibabel.affines.apply_affine(image.affine, np.argwhere(labels == LABEL[n]).mean(0))
           for n in ("liver", "spleen")}
    assert ras["liver"][0] > ras["spleen"][0]  # patient's right is +x in RAS
    np.testing.assert_allclose(ras["liver"][:2], -lps["liver"][:2], atol=0.01)


def test_anatomy_stays_put_in_the_world_whatever_the_grid(tmp_path):
    """Same seed, three orientations: the anatomy is the patient's, not the grid's."""
    centres = {}
    for orientation in ("lps", "ras", "oblique"):
        p = generate_case(11, spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation=orientation)
        write_case(p, tmp_path / orientation, tmp_path / orientation, "case")
        centres[orientation] = centroids_world_lps(tmp_path / orientation / "case.nii.gz")
    for name in ("liver", "spleen", "right_kidney", "left_kidney", "aorta"):
        np.testing.assert_allclose(centres["ras"][name], centres["lps"][name], atol=0.5)
        np.testing.assert_allclose(centres["oblique"][name], centres["lps"][name], atol=3.0)


def test_random_grids_stay_in_the_published_ranges():
    rng = np.random.default_rng(0)
    seen, cut = set(), 0
    for _ in range(300):
        width = rng.uniform(260, 370)
        grid = random_grid(rng, centre_xyz_mm=(0, 0, -100), body_width_mm=width)
        sz, sy, sx = grid.spacing_zyx_mm
        assert 0.6 <= sy == sx <= 1.0 and 1.0 <= sz <= 5.0
        # square, or shallower front to back where the field of view cuts the body
        assert 0.7 * grid.shape_zyx[2] <= grid.shape_zyx[1] <= grid.shape_zyx[2] <= 512
        assert 8 <= grid.shape_zyx[0] <= 200
        cut += grid.shape_zyx[2] * sx < width
        direction = np.asarray(grid.direction).reshape(3, 3)
        np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-12)
        seen.add("lps" if np.allclose(direction, np.eye(3)) else "ras" if np.allclose(
            direction, np.diag([-1, -1, 1])) else "oblique")
        np.testing.assert_allclose(grid.corners_xyz_mm().mean(0), (0, 0, -100), atol=1e-6)
    assert seen == {"lps", "ras", "oblique"}
    assert 0.15 < cut / 300 < 0.35  # a quarter of the fields of view cut the body at the sides


@pytest.mark.parametrize("phase", PHASES)
def test_ct_intensities_are_plausible(phase):
    p = generate_case(5, spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation="lps", phase=phase, n_lesions=0)
    assert p.image_zyx.dtype == np.int16 and p.phase == phase
    hu = p.image_zyx.astype(float)
    air = hu[:, 2:6, p.image_zyx.shape[2] // 2 - 5 : p.image_zyx.shape[2] // 2 + 5]  # in front of the body
    assert abs(air.mean() + 1000) < 15 and air.std() < 40
    inner = {name: ndimage.binary_erosion(p.organs_zyx == label, iterations=1) for name, label in LABEL.items()}
    median = {name: float(np.median(hu[mask])) for name, mask in inner.items() if mask.sum() > 20}
    assert 40 <= median["liver"] <= 160
    if phase == "non-contrast":
        assert 30 <= median["aorta"] <= 60 and median["liver"] > median["aorta"] - 5
    if phase == "arterial":
        assert median["aorta"] > 200 and median["aorta"] > median["inferior_vena_cava"] + 100
    if phase == "portal-venous":
        assert median["liver"] > 80 and median["inferior_vena_cava"] > 100
    assert median["gallbladder"] < 30
    assert hu.max() > 500  # bone
    body_fat = hu[(p.organs_zyx == 0) & (hu > -200) & (hu < -40)]
    assert body_fat.size > 1000 and -130 < np.median(body_fat) < -70


def test_liver_enhances_from_non_contrast_to_portal_venous():
    liver = {}
    for phase in PHASES:
        p = generate_case(6, spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation="lps", phase=phase, n_lesions=0)
        liver[phase] = float(np.median(p.image_zyx[ndimage.binary_erosion(p.organs_zyx == 1)]))
    assert liver["non-contrast"] < liver["arterial"] < liver["portal-venous"]


def test_mri_has_no_hounsfield_scale_and_other_contrast():
    ct = generate_case(4, spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation="lps", phase="portal-venous",
                       n_lesions=0)
    t1 = generate_case(4, modality="t1", spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation="lps", n_lesions=0)
    t2 = generate_case(4, modality="t2", spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation="lps", n_lesions=0)
    np.testing.assert_array_equal(ct.organs_zyx, t2.organs_zyx)  # the same anatomy
    assert t1.image_zyx.dtype == np.float32 and t1.image_zyx.min() >= 0 and t1.phase == "t1"
    air = t2.image_zyx[:, 2:6, :]  # Rician noise floor: positive, small against tissue
    assert 0 < air.mean() < 0.2 * np.percentile(t2.image_zyx, 99)

    def medians(p):
        return {n: float(np.median(p.image_zyx[ndimage.binary_erosion(p.organs_zyx == LABEL[n])]))
                for n in ("liver", "spleen", "right_kidney", "gallbladder", "aorta")}

    c, m1, m2 = medians(ct), medians(t1), medians(t2)
    # no monotonic map from CT: the kidney outshines the liver in both, the gallbladder flips ...
    assert c["right_kidney"] > c["liver"] and m2["right_kidney"] > m2["liver"]
    assert c["gallbladder"] < c["liver"] and m2["gallbladder"] > m2["liver"]
    assert c["aorta"] > c["liver"] and m1["aorta"] < m1["liver"]  # ... and flowing blood is dark in MRI
    assert m1["liver"] > m1["spleen"] and m2["liver"] < m2["spleen"]  # T1 and T2 differ too
    # an arbitrary scale: the same tissues land at very different values from case to case
    livers = [np.median(p.image_zyx[p.organs_zyx == 1]) for p in
              (generate_case(seed, modality="t2", spacing_zyx_mm=COARSE) for seed in range(4))]
    assert max(livers) / min(livers) > 3


def test_sequences_share_the_anatomy_and_are_slightly_misaligned(tmp_path):
    sequences = generate_patient_sequences(2, spacing_zyx_mm=COARSE, shape_zyx=TALL)
    assert list(sequences) == ["t1", "t2"]
    t1, t2 = sequences["t1"], sequences["t2"]
    assert t1.modality == "t1" and t2.modality == "t2"
    assert t1.direction != t2.direction and t1.origin_xyz_mm != t2.origin_xyz_mm
    moved = np.asarray(t2.origin_xyz_mm) - np.asarray(t1.origin_xyz_mm)
    assert np.linalg.norm(moved) < 20
    angle = np.degrees(np.arccos((np.trace(np.reshape(t1.direction, (3, 3)).T @ np.reshape(t2.direction, (3, 3)))
                                  - 1) / 2))
    assert 0 < angle < 5.5
    centres = {}
    for name, p in sequences.items():
        write_case(p, tmp_path / name, tmp_path / name, "case")
        centres[name] = centroids_world_lps(tmp_path / name / "case.nii.gz")
    for organ in ("liver", "spleen", "right_kidney", "left_kidney"):
        np.testing.assert_allclose(centres["t1"][organ], centres["t2"][organ], atol=2.0)


def test_template_anatomy_is_the_real_label_map_deformed():
    if not phantoms.TEMPLATE_LABELS.exists():
        pytest.skip("the real label map is not on this machine")
    a = generate_case(1, anatomy="template", spacing_zyx_mm=(3.0, 1.5, 1.5), orientation="lps")
    b = generate_case(2, anatomy="template", spacing_zyx_mm=(3.0, 1.5, 1.5), orientation="lps")
    for p in (a, b):
        present = set(np.unique(p.organs_zyx).tolist())
        assert {0, 1, 2, 3, 5, 6, 11, 13} <= present and 10 not in present  # the template has no esophagus
        liver_x = ndimage.center_of_mass(p.organs_zyx == 1)[2]
        spleen_x = ndimage.center_of_mass(p.organs_zyx == 3)[2]
        assert liver_x < spleen_x  # LPS grid: x index grows to the patient's left
        assert np.median(p.image_zyx[p.organs_zyx == 1]) > 20
    assert a.organs_zyx.shape != b.organs_zyx.shape or not np.array_equal(a.organs_zyx, b.organs_zyx)


def test_lesions_sit_in_organs_and_elsewhere_and_look_different():
    inside, outside = 0, 0
    for seed in range(4):
        p = generate_case(seed, spacing_zyx_mm=COARSE, shape_zyx=TALL, orientation="lps", n_lesions=4)
        lesion = p.lesions_zyx.astype(bool)
        assert p.lesions_zyx.max() <= 1 and lesion.any()
        inside += int((lesion & (p.organs_zyx > 0)).sum())
        outside += int((lesion & (p.organs_zyx == 0)).sum())
    assert inside > 0 and outside > 0


def test_lesion_patients_hold_a_lesion_and_the_others_share_their_anatomy():
    """min_lesions=1 (lesion datasets: cancer patients) takes the lesion-free draw away and changes
    nothing else of the patient."""
    from flarebox_tools.phantoms import draw_patient

    counts = []
    for seed in range(40):
        free, ill = draw_patient(np.random.default_rng(seed)), draw_patient(np.random.default_rng(seed), min_lesions=1)
        counts.append((len(free.lesions), len(ill.lesions)))
        assert ill.half_width_mm == free.half_width_mm and ill.fat_mm == free.fat_mm
    assert min(c for _, c in counts) >= 1 and min(c for c, _ in counts) == 0


def test_a_dataset_takes_its_phases_in_turn(tmp_path):
    out = write_dataset(tmp_path / "ds", 2, 7, label_set="lesion", spacing_zyx_mm=(6.0, 6.0, 6.0),
                        phases=("arterial", "portal-venous"))
    for n, phase in enumerate(("arterial", "portal-venous")):
        case = generate_case(7 + n, spacing_zyx_mm=(6.0, 6.0, 6.0), phase=phase, min_lesions=1)
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / f"phantom_{7 + n:04d}_0000.nii.gz")))
        np.testing.assert_array_equal(written, case.image_zyx)
    with pytest.raises(ValueError, match="phase"):
        write_dataset(tmp_path / "bad", 1, 0, phases=("delayed",))


def test_written_dataset_is_nnunet_raw_with_matching_geometry(tmp_path):
    out = write_dataset(tmp_path / "ds", 2, 40, spacing_zyx_mm=COARSE)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == ORGAN_LABELS and list(meta["labels"])[:3] == ["background", "liver", "right_kidney"]
    assert sorted(v for v in meta["labels"].values()) == list(range(14))
    for case in ("phantom_0040", "phantom_0041"):
        image = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        labels = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        assert image.GetSize() == labels.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), labels.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), labels.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), labels.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(image.GetSpacing()[::-1], COARSE, atol=1e-5)
        assert image.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= set(range(14))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                      generate_case(int(case[-4:]), spacing_zyx_mm=COARSE).image_zyx)


def test_lesion_dataset_on_mri(tmp_path):
    out = write_dataset(tmp_path / "ds", 1, 3, modality="t2", label_set="lesion", spacing_zyx_mm=COARSE)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"} and meta["labels"] == {"background": 0, "lesion": 1}
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "phantom_0003.nii.gz")))
    assert set(np.unique(labels)) <= {0, 1}
    image = sitk.ReadImage(str(out / "imagesTr" / "phantom_0003_0000.nii.gz"))
    assert image.GetPixelID() == sitk.sitkFloat32


def test_command_line(tmp_path):
    assert phantoms.main(["--out", str(tmp_path / "cli"), "--n", "1", "--seed", "9", "--spacing-scale", "4"]) == 0
    assert (tmp_path / "cli" / "imagesTr" / "phantom_0009_0000.nii.gz").exists()
    assert (tmp_path / "cli" / "labelsTr" / "phantom_0009.nii.gz").exists()
    assert json.loads((tmp_path / "cli" / "dataset.json").read_text())["numTraining"] == 1


def test_bad_arguments_are_refused():
    for kwargs, word in (({"modality": "pet"}, "modality"), ({"anatomy": "atlas"}, "anatomy"),
                         ({"phase": "delayed"}, "phase"), ({"orientation": "lai"}, "orientation")):
        with pytest.raises(ValueError, match=word):
            generate_case(0, spacing_zyx_mm=COARSE, **kwargs)


def test_write_dataset_keeps_existing_cases_and_leaves_no_temporary_files(tmp_path):
    out = write_dataset(tmp_path / "ds", 2, 40, spacing_zyx_mm=COARSE)
    first = out / "imagesTr" / "phantom_0040_0000.nii.gz"
    first.write_bytes(b"kept")  # a stand-in: an interrupted run's finished case is not made again
    (out / "imagesTr" / "phantom_0041_0000.nii.gz").unlink()  # the case an interruption cut short
    write_dataset(tmp_path / "ds", 2, 40, spacing_zyx_mm=COARSE, keep_existing=True)
    assert first.read_bytes() == b"kept"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["phantom_0040_0000.nii.gz",
                                                                    "phantom_0041_0000.nii.gz"]
    assert not [p for p in (out / "labelsTr").iterdir() if p.name.startswith(".")]
