"""export: back to the original grid (undo resampling, crop and transpose), both modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flarebox.export import Labels, to_original_grid
from flarebox.preprocess import preprocess
from flarebox.resample import resize_nearest


def blob_logits(shape, centre, radius):
    z, y, x = np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")
    distance = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    return np.stack([distance - radius, radius - distance]).astype(np.float32)


@pytest.mark.parametrize("mode", ["labels", "logits"])
def test_labels_land_on_the_original_grid(tiny_plan, mode):
    plan = dataclasses.replace(tiny_plan, transpose_forward=(0, 2, 1), transpose_backward=(0, 2, 1),
                               spacing_zyx_mm=(2.0, 2.0, 2.0))
    image = np.zeros((20, 40, 36), np.float32)
    image[4:16, 2:38, 6:30] = 50  # body box; outside is cropped away
    pre = preprocess(image.copy(), (1.0, 1.0, 1.0), plan)
    logits = blob_logits(pre.data.shape[1:], [s / 2 for s in pre.data.shape[1:]], 4)
    labels = to_original_grid(logits, pre, mode=mode)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert labels[image == 0].max() == 0  # nothing outside the crop
    # the blob is a sphere of radius 4 voxels at 2 mm = 8 mm around the crop centre
    z, y, x = np.nonzero(labels)
    assert (z.mean(), y.mean(), x.mean()) == pytest.approx((9.5, 19.5, 17.5), abs=0.6)
    volume_mm3 = labels.sum() * 1.0
    assert volume_mm3 == pytest.approx(4 / 3 * np.pi * 8**3, rel=0.15)


def test_logits_mode_is_smoother_than_labels_mode(tiny_plan):
    plan = dataclasses.replace(tiny_plan, spacing_zyx_mm=(4.0, 4.0, 4.0))
    image = np.full((48, 48, 48), 10, np.float32)
    pre = preprocess(image.copy(), (1.0, 1.0, 1.0), plan)
    logits = blob_logits(pre.data.shape[1:], (6, 6, 6), 3.3)
    sphere = blob_logits((48, 48, 48), (24, 24, 24), 13.2)[1] > 0
    errors = {m: np.sum(to_original_grid(logits, pre, mode=m).astype(bool) != sphere) for m in ("labels", "logits")}
    assert errors["logits"] < 0.5 * errors["labels"]


@pytest.mark.parametrize("transpose", [(0, 1, 2), (0, 2, 1)])
@pytest.mark.parametrize("slices", [1, 3, 16, 64])
def test_slabs_are_the_whole_map_a_few_slices_at_a_time(tiny_plan, transpose, slices):
    # a crop that leaves background on every side, z resampled (1 -> 2 mm), slab sizes that straddle it
    plan = dataclasses.replace(tiny_plan, transpose_forward=transpose, transpose_backward=transpose,
                               spacing_zyx_mm=(2.0, 1.5, 1.0))
    image = np.zeros((37, 30, 26), np.float32)
    image[5:29, 3:27, 2:21] = 50
    pre = preprocess(image.copy(), (1.0, 1.0, 1.0), plan, body_threshold=10)
    grid = np.random.default_rng(0).integers(1, 14, pre.data.shape[1:]).astype(np.uint8)
    labels = Labels.of(grid, pre)
    whole = labels.array()
    assert whole.shape == labels.shape_zyx == image.shape
    assert whole[image == 0].max() == 0 and whole[image > 0].min() >= 1  # the crop, and only it, labelled
    blocks = [block.copy() for block in labels.slabs(slices)]  # each block is one reused buffer
    assert all(len(block) == slices for block in blocks[:-1])
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    reference = np.zeros(pre.shape_before_crop, np.uint8)  # the whole grid in one resize, then transposed
    crop = tuple(slice(a, b) for a, b in pre.bbox)
    reference[crop] = resize_nearest(grid, reference[crop].shape)
    np.testing.assert_array_equal(whole, reference.transpose(transpose))
