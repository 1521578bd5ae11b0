"""postprocess: closing of every label, minimum lesion component size and organ-mask gating, measured in mm."""

from __future__ import annotations

import numpy as np
import pytest

from flarebox.postprocess import close_labels, gate_by_mask, remove_small_components


def _blobs() -> np.ndarray:
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[2:4, 2:4, 2:4] = 1  # 8 voxels
    labels[10:14, 10:15, 10:15] = 1  # 100 voxels
    labels[15, 25, 25] = 1  # 1 voxel
    labels[16, 26, 26] = 1  # touches the previous one by a corner: 26-connected, one component of 2
    labels[0:3, 20:30, 0:5] = 2  # another label: never touched
    return labels


@pytest.mark.parametrize(("spacing", "threshold", "kept"), [
    ((1.0, 1.0, 1.0), 9.0, {100}),  # 8 and 2 voxels go
    ((1.0, 1.0, 1.0), 2.0, {8, 100, 2}),  # exactly 2 mm3 survives: the rule is 'smaller than'
    ((2.0, 1.0, 1.0), 15.0, {8, 100}),  # anisotropic: 8 voxels are 16 mm3
])
def test_small_components_go_by_volume_in_mm3(spacing, threshold, kept):
    from scipy import ndimage

    labels = _blobs()
    out = remove_small_components(labels, spacing, threshold)
    ids, n = ndimage.label(out == 1, structure=np.ones((3, 3, 3)))
    assert {int((ids == i).sum()) for i in range(1, n + 1)} == kept
    np.testing.assert_array_equal(out == 2, labels == 2)
    assert labels.sum() == _blobs().sum()  # the input is not modified


def test_zero_threshold_changes_nothing():
    labels = _blobs()
    np.testing.assert_array_equal(remove_small_components(labels, (1, 1, 1), 0), labels)


def test_gate_keeps_components_within_margin_of_the_mask():
    labels = np.zeros((10, 60, 60), np.uint8)
    labels[4:6, 10:12, 10:12] = 1  # A: inside the organ
    labels[4:6, 10:12, 30:32] = 1  # B: 6 voxels (3 mm at 0.5 mm) right of the organ's edge
    labels[4:6, 50:52, 50:52] = 1  # C: far away
    organ = np.zeros_like(labels, dtype=bool)
    organ[2:8, 5:20, 5:25] = True  # x up to 24; B starts at x = 30
    spacing = (2.0, 0.5, 0.5)
    near = gate_by_mask(labels, organ, spacing, margin_mm=3.0)
    assert near[4, 10, 10] == 1 and near[4, 10, 30] == 1 and near[4, 50, 50] == 0
    tight = gate_by_mask(labels, organ, spacing, margin_mm=2.9)
    assert tight[4, 10, 10] == 1 and tight[4, 10, 30] == 0 and tight[4, 50, 50] == 0
    with pytest.raises(ValueError, match="shape"):
        gate_by_mask(labels, organ[1:], spacing, 3.0)


def _closing_reference(labels: np.ndarray, radius: int) -> np.ndarray:
    """Each label closed over the whole volume (no boxes), background filled in label order."""
    from scipy import ndimage

    out = labels.copy()
    pad = 2 * radius
    for index in np.unique(labels)[1:]:
        mask = np.pad(labels == index, pad)
        closed = ndimage.binary_closing(mask, np.ones((2 * radius + 1,) * 3, bool))[(slice(pad, -pad),) * 3]
        out[closed & (out == 0)] = index
    return out


def test_closing_fills_gaps_and_holes_of_each_label_and_only_background():
    labels = np.zeros((16, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 3
    labels[5, 5, 5] = 0  # a hole
    labels[2:10, 6, 2:10] = 0  # a one-voxel gap right through it
    labels[0:3, 15:20, 15:20] = 1  # at the volume's corner
    labels[1, 17, 17] = 0
    labels[12:15, 2:10, 2:10] = 2  # two voxels under label 3, a gap of 2 between: 3 wide no more
    out = close_labels(labels, 1)
    assert (out[2:10, 2:10, 2:10] == 3).all()  # gap and hole filled
    assert out[1, 17, 17] == 1  # at the border too
    assert (out[10:12] == 0).all()  # a 2-voxel gap between two labels stays: neither closes across it
    assert ((labels > 0) <= (out == labels)).all()  # no labelled voxel changes
    np.testing.assert_array_equal(out, _closing_reference(labels, 1))
    np.testing.assert_array_equal(close_labels(labels, 2), _closing_reference(labels, 2))
    assert close_labels(labels, 0) is labels


def test_closing_runs_from_the_task_config(tmp_path):
    from flarebox.config import from_dict
    from flarebox.errors import ConfigError

    assert from_dict({"postprocess": {"closing": 1}}, tmp_path).postprocess.closing == 1
    with pytest.raises(ConfigError, match="closing"):
        from_dict({"postprocess": {"closing": -1}}, tmp_path)
