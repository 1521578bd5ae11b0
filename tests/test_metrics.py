"""metrics: DeepMind's surface-distance as the reference, the organisers' rules, hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from flarebox_tools import metrics
from flarebox_tools.metrics import (
    LESION_TOLERANCE_MM,
    ORGAN_NAMES,
    ORGAN_TOLERANCE_MM,
    dice,
    normalized_surface_dice,
    score_case,
    score_class,
    score_files,
)
from flarebox_tools.synthetic import RAS, write_image

sd = pytest.importorskip("surface_distance")  # DeepMind's package (PyPI surface-distance 0.1)

SPACINGS = [(1.0, 1.0, 1.0), (2.5, 0.8, 0.9), (5.0, 0.6, 0.7), (0.7, 1.9, 1.3)]
TOLERANCES = sorted(set(ORGAN_TOLERANCE_MM.values()) | {LESION_TOLERANCE_MM, 0.5})


def blob_pair(seed: int, shape_zyx=(14, 30, 28), sigma: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping random smooth shapes: (prediction, ground truth)."""
    rng = np.random.default_rng(seed)
    gt = ndimage.gaussian_filter(rng.normal(size=shape_zyx), sigma) > 0.1
    pred = ndimage.gaussian_filter(rng.normal(size=shape_zyx), sigma) > 0.1
    return pred | (gt & (rng.random(shape_zyx) < 0.8)), gt


def deepmind_nsd(pred, gt, spacing, tolerance):
    distances = sd.compute_surface_distances(np.asarray(gt, bool), np.asarray(pred, bool), spacing)
    return sd.compute_surface_dice_at_tolerance(distances, tolerance)


def organisers_scores(pred, gt, spacing):
    """The organisers' evaluation loop, written out with DeepMind's functions."""
    scores = {}
    for label, name in enumerate(ORGAN_NAMES, start=1):
        gt_i, pred_i = gt == label, pred == label
        if not gt_i.any():
            scores[name] = {"dsc": 1.0, "nsd": 1.0} if not pred_i.any() else {"dsc": 0.0, "nsd": 0.0}
            continue
        if label in (5, 6, 10):
            z = np.nonzero(gt_i)[0]
            gt_i, pred_i = gt_i[z.min() : z.max()], pred_i[z.min() : z.max()]
        dsc = sd.compute_dice_coefficient(gt_i, pred_i)
        nsd = 0.0 if dsc < 0.2 else deepmind_nsd(pred_i, gt_i, spacing, ORGAN_TOLERANCE_MM[label])
        scores[name] = {"dsc": dsc, "nsd": nsd}
    return scores


# ---- DeepMind's surface-distance as the reference ---------------------------------------------------

@pytest.mark.parametrize("spacing", SPACINGS)
def test_area_table_equals_deepmind_for_every_code(spacing):
    reference = sd.lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    np.testing.assert_allclose(metrics._area_table(spacing), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_nsd_and_dsc_equal_deepmind_on_random_shapes(seed, spacing):
    pred, gt = blob_pair(seed)
    assert 0.2 < dice(pred, gt) < 0.95  # a case where the surfaces really differ
    for tolerance in TOLERANCES:
        assert normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(
            deepmind_nsd(pred, gt, spacing, tolerance), abs=1e-6)
    assert dice(pred, gt) == pytest.approx(sd.compute_dice_coefficient(gt, pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_organ_on_a_single_slice_equals_deepmind(seed):
    pred, gt = blob_pair(seed, shape_zyx=(1, 40, 40), sigma=2.0)
    pred3, gt3 = (np.pad(a, ((3, 4), (0, 0), (0, 0))) for a in (pred, gt))  # one slice inside a volume
    for spacing in SPACINGS:
        for tolerance in TOLERANCES:
            expected = deepmind_nsd(pred3, gt3, spacing, tolerance)
            assert normalized_surface_dice(pred3, gt3, spacing, tolerance) == pytest.approx(expected, abs=1e-6)
            assert normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_score_case_equals_the_organisers_loop(seed):
    """13 random organs; the prediction moves, loses and invents some, and overruns the aorta's slices."""
    rng = np.random.default_rng(seed)
    shape = (30, 48, 44)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    gt, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for label in range(1, 14):
        centre = rng.uniform([5, 8, 8], [25, 40, 36])
        radii = rng.uniform([2, 3, 3], [7, 9, 9])
        shift = rng.normal(0, 1.2, 3)
        gt[(((np.stack([zz, yy, xx], -1) - centre) / radii) ** 2).sum(-1) <= 1] = label
        if label in (3, 8):  # missed by the prediction
            continue
        pred[(((np.stack([zz, yy, xx], -1) - centre - shift) / radii) ** 2).sum(-1) <= 1] = label
    pred[(zz < 6) & ((yy - 10) ** 2 + (xx - 30) ** 2 < 9)] = 5  # aorta predicted outside the reference's slices
    gt[gt == 9] = 0  # a false positive: gallbladder only in the prediction
    spacing = (2.5, 0.8, 0.9)
    ours, theirs = score_case(pred, gt, spacing), organisers_scores(pred, gt, spacing)
    assert list(ours) == list(ORGAN_NAMES)
    for name in ORGAN_NAMES:
        assert ours[name]["dsc"] == pytest.approx(theirs[name]["dsc"], abs=1e-12), name
        assert ours[name]["nsd"] == pytest.approx(theirs[name]["nsd"], abs=1e-6), name
    assert ours["spleen"] == {"dsc": 0.0, "nsd": 0.0} and ours["gallbladder"] == {"dsc": 0.0, "nsd": 0.0}


# ---- hand-computed cases ------------------------------------------------------------------------------

def cube(shape=(24, 24, 24), low=5, high=15) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[low:high, low:high, low:high] = True
    return mask


def test_identical_masks_score_one():
    gt = blob_pair(11)[1]
    assert dice(gt, gt) == 1.0
    assert normalized_surface_dice(gt, gt, (2.5, 0.8, 0.8), 0.01) == pytest.approx(1.0, abs=1e-12)
    assert score_class(gt, gt, (2.5, 0.8, 0.8), 2.0) == {"dsc": 1.0, "nsd": pytest.approx(1.0, abs=1e-12)}


def test_cubes_offset_by_two_voxels():
    gt = cube()
    pred = np.roll(gt, 2, axis=2)  # 10 x 10 x 8 voxels overlap
    assert dice(pred, gt) == pytest.approx(2 * 800 / 2000)
    # every surface element is within 2 mm of the other surface (the x faces moved by exactly 2 mm) ...
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 2.0) == pytest.approx(1.0, abs=1e-12)
    # ... and with 3 mm along x the faces moved 6 mm: out of a 5 mm tolerance, within 6 mm
    assert normalized_surface_dice(pred, gt, (1, 1, 3), 5.0) < 0.95
    assert normalized_surface_dice(pred, gt, (1, 1, 3), 6.0) == pytest.approx(1.0, abs=1e-12)


def test_cube_grown_by_one_voxel_by_hand():
    """GT 10^3 voxels, prediction 12^3 around it, 1 mm voxels. Surface elements: a flat face's
    neighbourhood has area 1, an edge's sqrt(2)/2, a corner's sqrt(3)/8. Every GT element is 1 mm
    from the prediction's surface; the prediction's face elements are 1 mm from the GT's, its edge
    elements sqrt(2) mm and its corners sqrt(3) mm."""
    gt, pred = cube(low=5, high=15), cube(low=4, high=16)
    gt_area = 6 * 9 * 9 + 12 * 9 * math.sqrt(2) / 2 + 8 * math.sqrt(3) / 8
    faces, edges, corners = 6 * 11 * 11, 12 * 11 * math.sqrt(2) / 2, 8 * math.sqrt(3) / 8
    total = gt_area + faces + edges + corners
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 1.0) == pytest.approx((gt_area + faces) / total, abs=1e-12)
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 1.5) == pytest.approx((total - corners) / total, abs=1e-12)
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 1.8) == pytest.approx(1.0, abs=1e-12)
    assert dice(pred, gt) == pytest.approx(2 * 1000 / (1000 + 1728))


def test_empty_masks():
    empty, blob = np.zeros((6, 6, 6), bool), cube((6, 6, 6), 1, 4)
    assert score_class(empty, empty, (1, 1, 1), 2.0) == {"dsc": 1.0, "nsd": 1.0}
    assert score_class(blob, empty, (1, 1, 1), 2.0) == {"dsc": 0.0, "nsd": 0.0}
    assert score_class(empty, blob, (1, 1, 1), 2.0) == {"dsc": 0.0, "nsd": 0.0}
    assert normalized_surface_dice(empty, empty, (1, 1, 1), 2.0) == 1.0
    assert normalized_surface_dice(blob, empty, (1, 1, 1), 2.0) == 0.0
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[blob] = 1
    scores = score_case(labels, labels, (1, 1, 1))
    assert scores["liver"] == {"dsc": 1.0, "nsd": 1.0} and scores["spleen"] == {"dsc": 1.0, "nsd": 1.0}


def test_dsc_below_0_2_zeroes_nsd():
    gt = cube()
    pred = np.zeros_like(gt)
    pred[8:11, 8:11, 8:11] = True  # 27 voxels inside 1000: DSC 54/1027
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 5.0) > 0.3  # NSD by itself is not zero ...
    assert score_class(pred, gt, (1, 1, 1), 5.0) == {"dsc": pytest.approx(54 / 1027), "nsd": 0.0}  # ... the rule is


def test_aorta_is_scored_on_the_reference_slices_only():
    gt = np.zeros((30, 20, 20), np.uint8)
    gt[10:20, 8:12, 8:12] = 5  # aorta on slices 10..19
    pred = np.zeros_like(gt)
    pred[:, 8:12, 8:12] = 5  # predicted on every slice
    assert score_case(pred, gt, (2.5, 1.0, 1.0))["aorta"] == {"dsc": 1.0, "nsd": pytest.approx(1.0, abs=1e-12)}
    # the same masks as liver (no slice rule): 10 of 30 slices agree
    assert score_case(np.where(pred == 5, 1, 0), np.where(gt == 5, 1, 0), (2.5, 1, 1))["liver"]["dsc"] == 0.5
    # the reference's upper slice (19) is not scored: missing it costs the aorta nothing, the liver something
    short = np.where(np.arange(30)[:, None, None] < 19, gt, 0)
    assert score_case(short, gt, (2.5, 1.0, 1.0))["aorta"]["dsc"] == 1.0
    assert score_class(short == 5, gt == 5, (2.5, 1.0, 1.0), 2.0)["dsc"] == pytest.approx(2 * 9 / 19)
    # the rule holds for IVC and esophagus too, and for no other organ
    for label, name in ((6, "inferior_vena_cava"), (10, "esophagus"), (12, "duodenum")):
        scores = score_case(np.where(pred == 5, label, 0), np.where(gt == 5, label, 0), (2.5, 1.0, 1.0))
        assert scores[name]["dsc"] == (0.5 if label == 12 else 1.0)


def test_reference_on_a_single_slice():
    gt = np.zeros((10, 20, 20), np.uint8)
    gt[4, 5:15, 5:15] = 1  # a liver on one slice scores normally
    assert score_case(gt, gt, (3.0, 0.8, 0.8))["liver"] == {"dsc": 1.0, "nsd": pytest.approx(1.0, abs=1e-12)}
    # an aorta on one slice leaves an empty range [zmin, zmax): the organisers' NumPy-1 result is NaN
    scores = score_case(gt * 5, gt * 5, (3.0, 0.8, 0.8))
    assert math.isnan(scores["aorta"]["dsc"]) and math.isnan(scores["aorta"]["nsd"])


def test_lesion_task_is_binary():
    pred, gt = blob_pair(3)
    expected = {"dsc": dice(pred, gt), "nsd": deepmind_nsd(pred, gt, (2.5, 0.8, 0.9), LESION_TOLERANCE_MM)}
    scores = score_case(pred.astype(np.uint8) * 7, gt.astype(np.uint8) * 2, (2.5, 0.8, 0.9), "lesion")
    assert list(scores) == ["lesion"]
    assert scores["lesion"] == {"dsc": pytest.approx(expected["dsc"]), "nsd": pytest.approx(expected["nsd"], abs=1e-6)}
    with pytest.raises(ValueError, match="task"):
        score_case(pred.astype(np.uint8), gt.astype(np.uint8), (1, 1, 1), "tumour")


# ---- cropping -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("corner_zyx", [(0, 0, 0), (7, 21, 33), (26, 50, 52)])
def test_cropping_changes_nothing(corner_zyx):
    """The cropped computation equals the one on the whole volume, wherever the masks sit
    (including against the volume's border, where the margin is padding)."""
    pred, gt = blob_pair(5)
    big_pred, big_gt = np.zeros((40, 80, 80), bool), np.zeros((40, 80, 80), bool)
    box = tuple(slice(c, c + n) for c, n in zip(corner_zyx, pred.shape, strict=True))
    big_pred[box], big_gt[box] = pred, gt
    spacing = (2.5, 0.8, 0.9)
    for tolerance in TOLERANCES:
        whole = metrics._surface_dice(big_pred, big_gt, spacing, tolerance)  # no cropping
        assert normalized_surface_dice(big_pred, big_gt, spacing, tolerance) == pytest.approx(whole, abs=1e-12)
        assert normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(whole, abs=1e-12)


# ---- files ----------------------------------------------------------------------------------------------------

def test_score_files_reads_nifti_and_refuses_other_grids(tmp_path):
    pred, gt = blob_pair(8)
    labels_pred, labels_gt = pred.astype(np.uint8) * 2, gt.astype(np.uint8) * 2  # right kidney
    spacing_xyz = (0.875, 0.75, 2.5)  # exact in the file's float32
    gt_path = write_image(tmp_path / "gt.nii.gz", labels_gt, spacing_xyz=spacing_xyz, direction=RAS)
    pred_path = write_image(tmp_path / "pred.nii.gz", labels_pred, spacing_xyz=spacing_xyz, direction=RAS)
    scores = score_files(pred_path, gt_path)
    assert scores["right_kidney"]["nsd"] == pytest.approx(deepmind_nsd(pred, gt, spacing_xyz[::-1], 3.0), abs=1e-6)
    assert scores == score_case(labels_pred, labels_gt, (2.5, 0.75, 0.875))
    moved = write_image(tmp_path / "moved.nii.gz", labels_pred, spacing_xyz=spacing_xyz, origin=(0, 0, 2.5),
                        direction=RAS)
    with pytest.raises(ValueError, match=r"moved\.nii\.gz.*gt\.nii\.gz.*different voxel grids"):
        score_files(moved, gt_path)
    finer = write_image(tmp_path / "finer.nii.gz", labels_pred, spacing_xyz=(0.875, 0.75, 2.0), direction=RAS)
    with pytest.raises(ValueError, match="different voxel grids"):
        score_files(finer, gt_path)
