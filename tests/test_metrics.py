"""metrics: FLARE DSC/NSD rules, hand-computed cases, and DeepMind's surface-distance as reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from flarebox.metrics import dice, normalized_surface_dice, score_case, score_class

surface_distance = pytest.importorskip("surface_distance")


def random_shapes(seed, shape=(18, 28, 26)):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.05
    b = ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.05
    return a, b | (a & (rng.random(shape) < 0.9))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tolerance", [1.0, 2.0, 5.0])
def test_nsd_agrees_with_deepmind_surface_distance(seed, tolerance):
    gt, pred = random_shapes(seed)
    spacing = (2.5, 0.8, 0.9)
    distances = surface_distance.compute_surface_distances(gt, pred, spacing)
    reference = surface_distance.compute_surface_dice_at_tolerance(distances, tolerance)
    # Surface-element areas come from the neighbourhood's net normal, not DeepMind's per-triangle
    # marching-cubes table: measured differences stay under 0.01 (see the metrics docstring).
    assert normalized_surface_dice(pred, gt, spacing, tolerance) == pytest.approx(reference, abs=0.01)
    assert dice(pred, gt) == pytest.approx(surface_distance.compute_dice_coefficient(gt, pred), abs=1e-12)


def test_hand_computed_cubes():
    gt = np.zeros((20, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True
    pred = np.roll(gt, 2, axis=2)  # 10x10x8 overlap
    assert dice(pred, gt) == pytest.approx(2 * 800 / 2000)
    assert normalized_surface_dice(gt, gt, (1, 1, 1), 1.0) == 1.0
    # shifted by 2 voxels of 1 mm: the faces normal to x move by 2 mm, within a 2 mm tolerance
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 2.0) == pytest.approx(1.0)
    assert normalized_surface_dice(pred, gt, (1, 1, 1), 1.0) < 0.9
    # with 3 mm voxels along x the same shift is 6 mm: the x faces fall out of a 5 mm tolerance
    assert normalized_surface_dice(pred, gt, (1, 1, 3), 5.0) < 1.0


def test_flare_rules():
    empty = np.zeros((5, 5, 5), bool)
    blob = empty.copy()
    blob[1:4, 1:4, 1:4] = True
    assert score_class(empty, empty, (1, 1, 1), 2) == {"dsc": 1.0, "nsd": 1.0}
    assert score_class(blob, empty, (1, 1, 1), 2) == {"dsc": 0.0, "nsd": 0.0}
    assert score_class(empty, blob, (1, 1, 1), 2) == {"dsc": 0.0, "nsd": 0.0}
    tiny = empty.copy()
    tiny[2, 2, 2] = True  # DSC 2/28 < 0.2: NSD is zero whatever the surfaces say
    result = score_class(tiny, blob, (1, 1, 1), 5)
    assert result["dsc"] == pytest.approx(2 / 28) and result["nsd"] == 0.0


def test_z_range_rule_for_aorta_and_single_slice_organs():
    gt = np.zeros((30, 20, 20), np.uint8)
    gt[10:20, 8:12, 8:12] = 5  # aorta on slices 10..19
    pred = np.zeros_like(gt)
    pred[0:30, 8:12, 8:12] = 5  # predicted far beyond the reference's slices
    scores = score_case(pred, gt, (2.5, 1.0, 1.0))
    # scored on slices 10..18 only (upper slice excluded): a perfect match there
    assert scores["aorta"] == {"dsc": 1.0, "nsd": 1.0}
    single = np.zeros((30, 20, 20), np.uint8)
    single[7, 5:15, 5:15] = 1  # an organ on one slice: must not crash on NumPy 2
    scores = score_case(single, single, (2.5, 1.0, 1.0))
    assert scores["liver"]["dsc"] == 1.0 and scores["liver"]["nsd"] == 1.0
    assert scores["spleen"] == {"dsc": 1.0, "nsd": 1.0}  # absent in both


def test_lesion_task_is_binary_and_cropping_changes_nothing():
    gt, pred = random_shapes(7, shape=(16, 24, 24))
    big_gt = np.zeros((60, 90, 90), np.uint8)
    big_pred = np.zeros_like(big_gt)
    big_gt[20:36, 30:54, 40:64] = gt
    big_pred[20:36, 30:54, 40:64] = pred * 3  # any nonzero value is lesion
    small = score_case(pred.astype(np.uint8), gt.astype(np.uint8), (1, 1, 1), "lesion")
    large = score_case(big_pred, big_gt, (1, 1, 1), "lesion")
    assert small["lesion"] == pytest.approx(large["lesion"])
