"""preprocess: transpose, crop to nonzero, normalisation formulas, target shape, forced spacing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flarebox.models import Normalization
from flarebox.preprocess import (
    above,
    body_bbox,
    forced_spacing,
    nonzero_bbox,
    normalize,
    preprocess,
    target_shape,
)
from flarebox.resample import resize_linear


def test_ct_normalisation_clips_then_standardises():
    data = np.array([-2000, -958, 0, 270, 3000], np.float32)
    out = normalize(data.copy(), Normalization("CTNormalization", -97.3, 137.8, -958.0, 270.0))
    np.testing.assert_allclose(out, (np.clip(data, -958, 270) + 97.3) / 137.8, rtol=1e-6)


def test_zscore_with_and_without_mask():
    rng = np.random.default_rng(0)
    data = rng.normal(5, 3, size=(10, 10, 10)).astype(np.float32)
    out = normalize(data.copy(), Normalization("ZScoreNormalization"))
    assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1, rel=1e-4)
    mask = np.zeros(data.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    out = normalize(data.copy(), Normalization("ZScoreNormalization"), mask)
    assert out[~mask].max() == 0 and abs(out[mask].mean()) < 1e-5


def test_nonzero_bbox_ignores_holes_and_handles_empty():
    data = np.zeros((1, 10, 12, 14), np.float32)
    data[0, 2:7, 3:9, 4:10] = 1
    data[0, 4, 5, 6] = 0  # a hole changes no bounding box
    assert nonzero_bbox(data) == ((2, 7), (3, 9), (4, 10))
    assert nonzero_bbox(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))


def test_nonzero_bbox_of_a_volume_nonzero_on_every_face_and_of_one_voxel():
    ct = np.full((1, 6, 7, 8), -1000, np.int16)  # CT air: each face nonzero, so no crop
    ct[0, 3, 3, 3] = 0
    assert nonzero_bbox(ct) == ((0, 6), (0, 7), (0, 8))
    one = np.zeros((1, 6, 7, 8), np.int16)
    one[0, 5, 0, 7] = 3  # touches three faces only
    assert nonzero_bbox(one) == ((5, 6), (0, 1), (7, 8))
    two_channels = np.zeros((2, 6, 7, 8), np.float32)
    two_channels[0, 1, 2, 3] = two_channels[1, 4, 5, 6] = 1
    assert nonzero_bbox(two_channels) == ((1, 5), (2, 6), (3, 7))


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("threshold", [-500.0, -500.5, 0.0, 99.5, 254.9, -1e6, 1e6])
def test_threshold_compares_in_the_image_type_as_a_float_would(dtype, threshold):
    values = np.array([-32768, -1000, -501, -500, -499, 0, 99, 100, 254, 255, 32767])
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    image = np.clip(values, info.min, info.max).astype(dtype)
    expected = image.astype(np.float64) > threshold
    np.testing.assert_array_equal(above(image, threshold), expected)
    if np.issubdtype(dtype, np.integer):
        assert above(image.reshape(-1, 1, 1), threshold).dtype == bool


def test_body_bbox_on_an_int16_ct_matches_float():
    rng = np.random.default_rng(3)
    ct = np.full((20, 40, 30), -1000, np.int16)
    ct[4:15, 10:33, 5:21] = rng.integers(-300, 300, size=(11, 23, 16))
    box = body_bbox(ct, -500.0, (1, 2, 3))
    assert box == body_bbox(ct.astype(np.float32), -500.0, (1, 2, 3)) == ((3, 16), (8, 35), (2, 24))


def test_body_bbox_matches_the_mask_it_never_makes():
    rng = np.random.default_rng(5)
    image = rng.normal(-900.0, 150.0, size=(17, 23, 29)).astype(np.float32)
    image[rng.random(image.shape) < 0.05] = np.nan  # NaN is above nothing, as in a mask
    image[3, 20, 1] = image[9, 2, 27] = -100.0  # isolated body voxels at far corners
    for threshold in (-500.0, -200.0, 1e9):
        mask = image > threshold
        hits = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        expected = tuple((int(h[0]), int(h[-1]) + 1) for h in hits) if mask.any() else ((0, 17), (0, 23), (0, 29))
        assert body_bbox(image, threshold, (0, 0, 0)) == expected


def test_target_shape_rounds_like_nnunet():
    assert target_shape((300, 512, 512), (2.5, 0.8, 0.8), (2.5, 2.5, 2.5)) == (300, 164, 164)
    assert target_shape((31, 101, 122), (3.0, 3.0, 3.0), (1.0, 0.8, 0.8)) == (93, 379, 458)


def test_forced_spacing_rule_by_slice_count():
    default = (2.5, 0.8, 0.8)
    assert forced_spacing((1.25, 0.7, 0.7), default, 100) == (1.25, 0.8, 0.8)
    assert forced_spacing((1.25, 0.7, 0.7), default, 400) == default
    assert forced_spacing((1.0, 0.7, 0.7), default, 1000) == pytest.approx((0.8 * 2.5, 0.8, 0.8))
    assert forced_spacing((1.0, 0.7, 0.7), default, 700) == pytest.approx((600 / 700 * 2.5, 0.8, 0.8))


def test_preprocess_end_to_end(tiny_plan):
    plan = dataclasses.replace(tiny_plan, transpose_forward=(2, 1, 0), transpose_backward=(2, 1, 0),
                               spacing_zyx_mm=(2.0, 2.0, 4.0))
    image = np.zeros((10, 20, 30), np.float32)  # z, y, x at (4, 2, 1) mm
    image[2:8, 5:15, 3:27] = 100
    pre = preprocess(image, (4.0, 2.0, 1.0), plan)
    # transposed to (x, y, z) with spacing (1, 2, 4); cropped to 24 x 10 x 6; resampled to (2, 2, 4) mm
    assert pre.bbox == ((3, 27), (5, 15), (2, 8))
    assert pre.data.shape == (1, 12, 10, 6)
    norm = plan.normalizations[0]
    expected = (np.clip(100, norm.clip_low, norm.clip_high) - norm.mean) / norm.std
    np.testing.assert_allclose(pre.data, expected, rtol=1e-5)


def test_body_crop_keeps_the_body_and_a_margin_and_export_restores_the_grid(tiny_plan):
    from flarebox.export import to_original_grid

    plan = dataclasses.replace(tiny_plan, spacing_zyx_mm=(3.0, 2.0, 2.0))
    image = np.full((12, 60, 50), -1000, np.float32)  # air, at (3, 2, 2) mm
    image[:, 20:40, 10:30] = 40  # the body
    image[5, 2, 2] = -600  # noise below the threshold: not body
    pre = preprocess(image.copy(), (3.0, 2.0, 2.0), plan, body_threshold=-500, body_margin_mm=4.0)
    # 4 mm of margin is 2 voxels in-plane and 2 slices (ceil(4 / 3)), clipped to the image in z
    assert pre.bbox == ((0, 12), (18, 42), (8, 32))
    assert pre.data.shape == (1, 12, 24, 24)
    # tiles overhanging a side the crop cut see air (the crop's minimum); beyond the scan (z here) 0
    norm = plan.normalizations[0]
    air = pytest.approx((max(-1000, norm.clip_low) - norm.mean) / norm.std, rel=1e-6)
    assert pre.pad_values == ((0.0, 0.0), (air, air), (air, air))
    plain = preprocess(image.copy(), (3.0, 2.0, 2.0), plan)
    assert plain.bbox == ((0, 12), (0, 60), (0, 50))  # nnU-Net's nonzero crop never crops a CT
    assert plain.pad_values == ((0.0, 0.0),) * 3  # nnU-Net's padding
    logits = np.zeros((plan.num_classes, *pre.data.shape[1:]), np.float32)
    logits[1] = 1.0  # class 1 everywhere inside the crop
    labels = to_original_grid(logits, pre)
    assert labels.shape == image.shape
    assert (labels[:, 18:42, 8:32] == 1).all() and labels.sum() == 12 * 24 * 24  # background outside
    empty = preprocess(np.full((4, 8, 8), -1000, np.float32), (3.0, 2.0, 2.0), plan, body_threshold=-500)
    assert empty.bbox == ((0, 4), (0, 8), (0, 8))  # no body found: nothing cropped


@pytest.mark.parametrize("spacing", [(2.0, 1.0, 1.5), (3.0, 2.0, 2.0)])  # z resampled, or not
def test_ct_slab_path_equals_whole_volume_path(tiny_plan, spacing):
    """A CT is normalised and resampled in-plane slab by slab (SLAB_SLICES at a time), then along z:
    the same, within float rounding, as the whole crop made float32, normalised and resampled."""
    from flarebox import preprocess as module

    assert tiny_plan.normalizations[0].scheme == "CTNormalization" and not tiny_plan.use_mask_for_norm[0]
    plan = dataclasses.replace(tiny_plan, spacing_zyx_mm=(3.0, 2.0, 2.0))
    rng = np.random.default_rng(5)
    image = rng.integers(-1000, 1500, size=(2 * module.SLAB_SLICES + 7, 41, 37)).astype(np.int16)
    pre = preprocess(image, spacing, plan, body_threshold=-2000, resampler="numpy")
    assert pre.bbox == ((0, image.shape[0]), (0, 41), (0, 37))
    whole = image.astype(np.float32)
    normalize(whole, plan.normalizations[0])
    expected = resize_linear(whole[None], pre.data.shape[1:], engine="numpy")
    np.testing.assert_allclose(pre.data, expected, rtol=1e-5, atol=1e-5)
