"""Read and write: case discovery, NIfTI reading with full geometry, atomic label writing.

SimpleITK arrays are (z, y, x) while its spacing, origin and size are (x, y, z); that conversion
happens here and nowhere else. Inputs are never written to. Outputs are written to a temporary file
beside the target and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flarebox.errors import CaseError

INPUT_SUFFIX = "_0000.nii.gz"


@dataclass(frozen=True)
class Geometry:
    """Where the voxel grid lies in the world, in SimpleITK's terms (x, y, z order)."""

    spacing_xyz_mm: tuple[float, ...]
    origin_xyz_mm: tuple[float, ...]
    direction: tuple[float, ...]
    size_xyz: tuple[int, ...]

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        x, y, z = self.spacing_xyz_mm
        return (z, y, x)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        x, y, z = self.size_xyz
        return (z, y, x)


@dataclass(frozen=True)
class Case:
    case_id: str
    path: Path


@dataclass(frozen=True)
class Volume:
    array_zyx: np.ndarray  # the file's voxel type (int16 for most CT); preprocess makes float32 of its crop
    geometry: Geometry


def discover(input_dir: Path) -> tuple[list[Case], list[CaseError]]:
    """Cases by the `<case>_0000.nii.gz` convention, sorted; every other visible file is an error."""
    cases, rejected = [], []
    for path in sorted(Path(input_dir).iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.name.endswith(INPUT_SUFFIX) and len(path.name) > len(INPUT_SUFFIX):
            cases.append(Case(path.name[: -len(INPUT_SUFFIX)], path))
        else:
            rejected.append(CaseError(path, f"not an input case: expected <case>{INPUT_SUFFIX}"))
    return cases, rejected


FLOAT_DATATYPES = {16, 64, 1536}  # NIfTI float32, float64, float128


def _nifti_datatype(header: bytes) -> int:
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            return struct.unpack(endian + "h", header[70:72])[0]
        if sizeof_hdr == 540:
            return struct.unpack(endian + "h", header[12:14])[0]
    return 0


def _expected_nifti_bytes(header: bytes) -> int | None:
    """Uncompressed file size implied by a NIfTI-1 or NIfTI-2 header (None when it can't be told)."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif sizeof_hdr == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        n_dims = dims[0]
        if not 1 <= n_dims <= 7 or bitpix <= 0:
            return None
        voxels = 1
        for d in dims[1 : n_dims + 1]:
            voxels *= max(int(d), 1)
        return max(offset, sizeof_hdr + 4) + voxels * bitpix // 8
    raise CaseError("", "")  # replaced by the caller's message


def _gzip_member_is_complete(path: Path) -> bool:
    """Decompress the whole stream once, checking its CRC and length (slow path, rarely taken)."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error):
        return False
    return True


def _check_nifti_file(path: Path) -> int:
    """Fail early and plainly where ITK would either print a long stack of messages or, for a
    truncated .nii.gz, silently fill the missing voxels with zeros."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]  # gzip trailer: uncompressed size mod 2**32
        if magic != b"\x1f\x8b":
            raise CaseError(path, "cannot read: not gzip-compressed (expected a .nii.gz file)")
        with gzip.open(path, "rb") as fh:
            header = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise CaseError(path, f"cannot read: corrupt gzip stream ({exc})") from exc
    if len(header) < 348:
        raise CaseError(path, "cannot read: truncated file (shorter than a NIfTI header)")
    try:
        expected = _expected_nifti_bytes(header)
    except CaseError:
        raise CaseError(path, "cannot read: not a NIfTI file (bad header)") from None
    # The trailer check is O(1); a mismatch is confirmed by full decompression before rejecting,
    # since a multi-member gzip file legitimately carries only its last member's size there.
    if expected is not None and isize != expected % 2**32 and not _gzip_member_is_complete(path):
        raise CaseError(path, "cannot read: truncated or corrupt image data (gzip stream ends early)")
    return _nifti_datatype(header)


def _count_non_finite(path: Path) -> int:
    """ITK's NIfTI reader turns NaN into 0 without a word, so float files are checked on the raw data."""
    import nibabel

    data = np.asanyarray(nibabel.load(str(path)).dataobj)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def read_image(path: Path) -> tuple[sitk.Image, Volume]:
    """Read a 3D NIfTI image; returns the ITK image (for its metadata) and a (z, y, x) volume in the
    file's voxel type (float when the header scales the values): a CT stays int16, half the memory
    and bandwidth of float32 until preprocessing has cropped it."""
    path = Path(path)
    datatype = _check_nifti_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "rror" in line), first[-1] if first else "")
        raise CaseError(path, f"cannot read: truncated or corrupt image data ({detail.strip()[:120]})") from exc
    dim = image.GetDimension()
    if dim != 3:
        raise CaseError(path, f"{dim}D image of size {image.GetSize()}: expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(path, f"{image.GetNumberOfComponentsPerPixel()} components per voxel: expected 1")
    if min(image.GetSize()) < 2:
        raise CaseError(path, f"image of size {image.GetSize()} is flat: expected a 3D volume")
    if datatype in FLOAT_DATATYPES and (bad := _count_non_finite(path)):
        raise CaseError(path, f"{bad} voxels are NaN or infinite")
    geometry = Geometry(
        spacing_xyz_mm=tuple(image.GetSpacing()),
        origin_xyz_mm=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
        size_xyz=tuple(image.GetSize()),
    )
    return image, Volume(_owning_view(image), geometry)


class _ImageVoxels:
    """The voxels of an ITK image as an array interface that keeps the image alive: arrays made
    from it hold this object as their base, so no copy is needed (a bare view from
    GetArrayViewFromImage dangles once the image is freed). Read-only, like that view."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        view = sitk.GetArrayViewFromImage(image)
        self.__array_interface__ = {**view.__array_interface__, "data": (view.__array_interface__["data"][0], True)}


def _owning_view(image: sitk.Image) -> np.ndarray:
    return np.asarray(_ImageVoxels(image))


def read_case(case: Case) -> Volume:
    return read_image(case.path)[1]


def write_labels(path: Path, labels_zyx: np.ndarray, geometry: Geometry, compression_level: int = 1) -> None:
    """Write uint8 labels on the given geometry, atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if tuple(labels_zyx.shape) != geometry.shape_zyx:
        raise ValueError(f"labels of shape {labels_zyx.shape} do not fit the grid {geometry.shape_zyx}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels_zyx, dtype=np.uint8))
    image.SetSpacing(geometry.spacing_xyz_mm)
    image.SetOrigin(geometry.origin_xyz_mm)
    image.SetDirection(geometry.direction)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        # Level 1 writes a 512x512x300 label map in ~0.1 s; higher levels gain little on label maps.
        sitk.WriteImage(image, tmp, True, compression_level)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
