"""io: case discovery, reading with geometry, validation of bad inputs, atomic writing."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import SimpleITK as sitk

from flarebox import io
from flarebox.errors import CaseError
from tests.images import write_image


def test_discover_follows_the_naming_convention(tmp_path):
    for name in ("b_0000.nii.gz", "a_0000.nii.gz", "notes.txt", "c_0001.nii.gz", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    cases, rejected = io.discover(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b"]
    assert sorted(e.path.name for e in rejected) == ["c_0001.nii.gz", "notes.txt"]


def test_read_keeps_geometry_and_axis_order(tmp_path):
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # z, y, x
    path = write_image(tmp_path / "x_0000.nii.gz", array, spacing_xyz=(0.7, 0.8, 2.5), origin=(1, 2, 3))
    image, volume = io.read_image(path)
    assert volume.array_zyx.dtype == np.int16  # the file's type: preprocess converts its crop
    np.testing.assert_array_equal(volume.array_zyx, array)
    assert volume.geometry.spacing_zyx_mm == pytest.approx((2.5, 0.8, 0.7))
    assert volume.geometry.shape_zyx == (5, 6, 7)
    assert volume.geometry.origin_xyz_mm == pytest.approx((1, 2, 3))


@pytest.mark.parametrize(
    ("maker", "reason"),
    [
        (lambda p: p.write_bytes(gzip.compress(b"\x00" * 400)[:10] + b"garbage" * 50), "corrupt gzip"),
        (lambda p: p.write_text("this is not an image"), "not gzip-compressed"),
        (lambda p: p.write_bytes(gzip.compress(b"hello world" * 100)), "not a NIfTI file"),
    ],
)
def test_read_rejects_broken_files_with_one_line(tmp_path, maker, reason):
    path = tmp_path / "bad_0000.nii.gz"
    maker(path)
    with pytest.raises(CaseError) as info:
        io.read_image(path)
    assert reason in info.value.reason
    assert "\n" not in str(info.value)
    assert info.value.path == path


def test_read_rejects_truncated_2d_4d_and_nan(tmp_path):
    good = write_image(tmp_path / "good_0000.nii.gz", np.random.default_rng(0).normal(size=(20, 30, 30)))
    truncated = tmp_path / "trunc_0000.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    flat = tmp_path / "flat_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(flat))
    four_d = tmp_path / "four_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(four_d))
    nan = np.zeros((4, 5, 6), np.float32)
    nan[1, 2, 3] = np.nan
    nan_path = write_image(tmp_path / "nan_0000.nii.gz", nan)
    expected = {truncated: "truncated or corrupt", flat: "2D image", four_d: "4D image", nan_path: "NaN"}
    for path, reason in expected.items():
        with pytest.raises(CaseError) as info:
            io.read_image(path)
        assert reason in info.value.reason, (path, info.value.reason)


def test_write_labels_is_atomic_and_exact(tmp_path):
    _, volume = io.read_image(write_image(tmp_path / "in_0000.nii.gz", np.zeros((3, 4, 5)), spacing_xyz=(1, 2, 3)))
    labels = np.random.default_rng(1).integers(0, 14, size=(3, 4, 5)).astype(np.uint8)
    out = tmp_path / "out" / "in.nii.gz"
    out.parent.mkdir()
    io.write_labels(out, labels, volume.geometry)
    assert os.listdir(out.parent) == ["in.nii.gz"]
    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    with pytest.raises(ValueError, match="do not fit"):
        io.write_labels(out.parent / "x.nii.gz", labels[:2], volume.geometry)
    assert os.listdir(out.parent) == ["in.nii.gz"]


def test_a_volume_keeps_the_itk_image_it_views_alive(tmp_path):
    # the voxels are not copied out of the ITK image: the array must keep that image alive
    import gc

    expected = np.random.default_rng(0).random((20, 30, 40), dtype=np.float32) * 500
    path = write_image(tmp_path / "mri_0000.nii.gz", expected)
    volume = io.read_image(path)[1]
    gc.collect()
    _ = [np.full((20, 30, 40), 1e12, np.float32) for _ in range(20)]  # reuse freed memory, if any
    assert np.array_equal(volume.array_zyx, expected)
    voxels = io.read_image(path)[1].array_zyx  # the Volume (and its image) gone: the array still holds it
    gc.collect()
    _ = [np.full((20, 30, 40), 1e12, np.float32) for _ in range(20)]
    assert np.array_equal(voxels, expected) and not voxels.flags.writeable
