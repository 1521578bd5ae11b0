"""io: case discovery, reading with geometry, validation of bad inputs, atomic writing."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from flarebox import io
from flarebox.errors import CaseError
from flarebox_tools.synthetic import LPS, RAS, oblique, write_image


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
    volume = io.read_image(path)
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


@pytest.mark.parametrize("spacing", [(0.001, 1.0, 1.0), (60.0, 60.0, 60.0), (0.8, 0.8, 25.0)])
def test_absurd_spacing_is_one_clear_line(tmp_path, spacing):
    image = sitk.GetImageFromArray(np.zeros((8, 9, 10), np.int16))
    image.SetSpacing(spacing)
    path = tmp_path / "x_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    with pytest.raises(CaseError, match="outside any scanner's range") as info:
        io.read_image(path)
    assert "\n" not in info.value.reason


def test_write_labels_is_atomic_and_exact(tmp_path):
    volume = io.read_image(write_image(tmp_path / "in_0000.nii.gz", np.zeros((3, 4, 5)), spacing_xyz=(1, 2, 3)))
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


def _scaled_file(path, values, slope):
    """An int16 NIfTI file whose header scales its values (read through ITK, as float)."""
    import nibabel

    image = nibabel.Nifti1Image(np.round(values / slope).astype(np.int16).transpose(2, 1, 0), np.eye(4))
    image.header.set_slope_inter(slope, 0.0)
    nibabel.save(image, str(path))
    return path


def test_a_volume_keeps_the_itk_image_it_views_alive(tmp_path):
    # files ITK reads (here a scaled one) are viewed in its buffer: the array must keep the image alive
    import gc

    expected = np.random.default_rng(0).integers(-500, 500, (20, 30, 40)).astype(np.float32)
    path = _scaled_file(tmp_path / "mri_0000.nii.gz", expected, 0.5)
    volume = io.read_image(path)
    assert volume.array_zyx.dtype == np.float32
    gc.collect()
    _ = [np.full((20, 30, 40), 1e12, np.float32) for _ in range(20)]  # reuse freed memory, if any
    assert np.array_equal(volume.array_zyx, expected)
    voxels = io.read_image(path).array_zyx  # the Volume (and its image) gone: the array still holds it
    gc.collect()
    _ = [np.full((20, 30, 40), 1e12, np.float32) for _ in range(20)]
    assert np.array_equal(voxels, expected) and not voxels.flags.writeable


GEOMETRIES = {
    "LPS": LPS,
    "RAS": RAS,
    "oblique": oblique(),
    "mirrored": (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0),
    "oblique mirrored": tuple((np.array(oblique(31.0)).reshape(3, 3) @ np.diag([1.0, -1.0, 1.0])).ravel()),
}


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("direction", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_direct_read_matches_itk(tmp_path, direction, dtype):
    # plain files are inflated straight into NumPy: voxels, type and geometry as ITK reads them
    values = np.random.default_rng(3).integers(0, 120, (6, 7, 9)).astype(dtype)
    path = write_image(tmp_path / "x_0000.nii.gz", values, spacing_xyz=(0.7, 0.9, 2.5), origin=(-3, 4.5, 8),
                       direction=direction)
    volume, itk = io.read_image(path), sitk.ReadImage(str(path))
    assert volume.array_zyx.dtype == sitk.GetArrayViewFromImage(itk).dtype == dtype
    np.testing.assert_array_equal(volume.array_zyx, sitk.GetArrayViewFromImage(itk))
    assert volume.geometry == io.Geometry(itk.GetSpacing(), itk.GetOrigin(), itk.GetDirection(), itk.GetSize())


def test_direct_read_of_a_multi_member_gzip_is_whole_and_read_only(tmp_path):
    # bgzip-style files hold several gzip members; the one-call inflate must read past the first
    values = np.random.default_rng(6).integers(-1000, 1000, (9, 8, 7)).astype(np.int16)
    single = write_image(tmp_path / "one_0000.nii.gz", values)
    raw = gzip.decompress(single.read_bytes())
    split = tmp_path / "two_0000.nii.gz"
    split.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    volume = io.read_image(split)
    np.testing.assert_array_equal(volume.array_zyx, values)
    assert not volume.array_zyx.flags.writeable  # as on ITK's path: nothing writes into an input


def test_a_corrupt_stream_with_a_whole_trailer_is_one_clear_error(tmp_path):
    # the trailer's size is right, so only the inflate itself finds the damage
    values = np.random.default_rng(8).normal(size=(20, 30, 30))
    good = write_image(tmp_path / "good_0000.nii.gz", values)
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    bad = tmp_path / "bad_0000.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(CaseError) as info:
        io.read_image(bad)
    assert "truncated or corrupt" in info.value.reason and "\n" not in str(info.value)


def test_direct_read_on_a_file_system_without_memory_maps(tmp_path, monkeypatch):
    values = np.random.default_rng(7).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    path = write_image(tmp_path / "x_0000.nii.gz", values)

    def no_maps(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap raises where a file system cannot map

    monkeypatch.setattr(io.mmap, "mmap", no_maps)
    np.testing.assert_array_equal(io.read_image(path).array_zyx, values)


def test_scaled_files_are_read_through_itk_as_float(tmp_path):
    values = np.random.default_rng(4).integers(-1000, 1000, (6, 7, 9)).astype(np.float64)
    volume = io.read_image(_scaled_file(tmp_path / "s_0000.nii.gz", values, 0.25))
    assert volume.array_zyx.dtype.kind == "f"
    np.testing.assert_allclose(volume.array_zyx, np.round(values / 0.25) * 0.25)


@pytest.mark.parametrize("direction", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_written_header_matches_itks(tmp_path, direction):
    # our header must give every reader what ITK's own writer gives it: the input's geometry
    import nibabel

    labels = np.random.default_rng(5).integers(0, 14, (6, 7, 9)).astype(np.uint8)
    geometry = io.Geometry((0.7, 0.9, 2.5), (-3.0, 4.5, 8.0), direction, (9, 7, 6))
    ours = tmp_path / "ours.nii.gz"
    io.write_labels(ours, labels, geometry)
    theirs = write_image(tmp_path / "itk.nii.gz", labels, spacing_xyz=geometry.spacing_xyz_mm,
                         origin=geometry.origin_xyz_mm, direction=direction)
    back = sitk.ReadImage(str(ours))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), labels)
    np.testing.assert_allclose(back.GetSpacing(), geometry.spacing_xyz_mm, rtol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), geometry.origin_xyz_mm, atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), geometry.direction, atol=1e-6)
    ours_nib, theirs_nib = nibabel.load(str(ours)), nibabel.load(str(theirs))
    np.testing.assert_allclose(ours_nib.header.get_qform(), theirs_nib.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(ours_nib.header.get_sform(), theirs_nib.header.get_sform(), atol=1e-6)
    for field in ("qform_code", "sform_code", "xyzt_units", "dim", "datatype", "bitpix"):
        assert ours_nib.header[field].tolist() == theirs_nib.header[field].tolist(), field
    assert ours_nib.header["pixdim"][0] == theirs_nib.header["pixdim"][0]  # qfac
    np.testing.assert_array_equal(np.asarray(ours_nib.dataobj), labels.transpose(2, 1, 0))


def test_write_labels_from_blocks_of_slices(tmp_path):
    geometry = io.Geometry((0.7, 0.9, 2.5), (-3.0, 4.5, 8.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (9, 7, 6))
    labels = np.random.default_rng(2).integers(0, 14, (6, 7, 9)).astype(np.uint8)
    io.write_labels(tmp_path / "whole.nii.gz", labels, geometry)
    io.write_labels(tmp_path / "blocks.nii.gz", iter([labels[:4], labels[4:5], labels[5:]]), geometry)
    assert (gzip.decompress((tmp_path / "blocks.nii.gz").read_bytes())
            == gzip.decompress((tmp_path / "whole.nii.gz").read_bytes()))
    for blocks in ([labels[:4], labels[4:5]], [labels, labels[:1]], [labels[:, :3]]):  # short, long, wrong y
        with pytest.raises(ValueError, match="do not fit"):
            io.write_labels(tmp_path / "bad.nii.gz", iter(blocks), geometry)
    assert sorted(os.listdir(tmp_path)) == ["blocks.nii.gz", "whole.nii.gz"]  # no half-written file left


def test_the_engine_imports_without_simpleitk():
    # ITK's import (0.06 s) runs beside the first inflate (run_folder), not before the read can start
    import subprocess
    import sys

    code = "import sys, flarebox.cli, flarebox.pipeline; print('SimpleITK' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


SHEARED = np.array([[0.8, 0.3, 0.0, 10.0], [0.0, 0.8, 0.05, 20.0], [0.0, 0.0, 2.5, 30.0], [0.0, 0.0, 0.0, 1.0]])
ORTHONORMAL = np.array([[-0.8, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, 20.0], [0.0, 0.0, 2.5, 30.0], [0.0, 0.0, 0.0, 1.0]])


def _nifti(path: Path, data_xyz: np.ndarray, sform: np.ndarray | None, qform: np.ndarray | None) -> Path:
    import nibabel

    image = nibabel.Nifti1Image(data_xyz, None)
    image.set_sform(sform, code=1 if sform is not None else 0)
    image.set_qform(qform, code=1 if qform is not None else 0)
    nibabel.save(image, str(path))
    return path


@pytest.mark.parametrize(("sform", "qform"), [(SHEARED, None), (SHEARED, ORTHONORMAL), (None, ORTHONORMAL)],
                         ids=["sheared sform only", "sheared sform and qform", "qform only"])
def test_sheared_and_qform_only_inputs_are_read_and_labels_keep_the_inputs_affine(tmp_path, sform, qform):
    """ITK refuses a sheared sform alone and reads the qform instead when there is one; either way
    the organisers' tools read the sform. The engine works on the nearest orthonormal frame and the
    labels carry the input's own qform and sform."""
    import nibabel

    data = np.random.default_rng(0).integers(-1000, 1000, size=(10, 9, 8)).astype(np.int16)  # x, y, z
    path = _nifti(tmp_path / "x_0000.nii.gz", data, sform, qform)
    volume = io.read_image(path)
    np.testing.assert_array_equal(volume.array_zyx, data.transpose(2, 1, 0))
    direction = np.asarray(volume.geometry.direction).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-6)  # orthonormal for the engine
    assert min(volume.geometry.spacing_xyz_mm) > 0.7
    labels = (volume.array_zyx > 0).astype(np.uint8)
    io.write_labels(tmp_path / "x.nii.gz", labels, volume.geometry)
    source, written = nibabel.load(str(path)), nibabel.load(str(tmp_path / "x.nii.gz"))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    if sform is not None:  # the sheared input's header, exactly: both forms and their codes
        for key in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c",
                    "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim"):
            np.testing.assert_array_equal(written.header[key], source.header[key], err_msg=key)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.transpose(2, 1, 0))
