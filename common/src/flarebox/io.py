"""Read and write: case discovery, NIfTI reading with full geometry, atomic label writing.

SimpleITK arrays are (z, y, x) while its spacing, origin and size are (x, y, z); that conversion
happens here and nowhere else. Inputs are never written to. Outputs are written to a temporary file
beside the target and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from isal import igzip, isal_zlib

from flarebox.errors import CaseError

if TYPE_CHECKING:
    import SimpleITK as sitk


def itk() -> ModuleType:
    """SimpleITK, imported when first wanted: its import need not delay the first read, whose
    inflate needs only ISA-L (run_folder imports it beside that inflate)."""
    import SimpleITK

    return SimpleITK

INPUT_SUFFIX = "_0000.nii.gz"


@dataclass(frozen=True)
class Geometry:
    """Where the voxel grid lies in the world, in SimpleITK's terms (x, y, z order)."""

    spacing_xyz_mm: tuple[float, ...]
    origin_xyz_mm: tuple[float, ...]
    direction: tuple[float, ...]
    size_xyz: tuple[int, ...]
    # A sheared input's own NIfTI-1 header: its grid has no orthonormal direction, so the fields above
    # are the nearest orthonormal frame (for the engine) and the output copies this header (for the
    # organisers, whose tools read the input's affine)
    nifti_header: bytes | None = field(default=None, repr=False)

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


# Voxel sizes a CT or MRI scanner writes: anything outside is a broken header, and resampling it to
# the model's grid would be absurd (64 voxels of 60 mm make 1536 of 2.5 mm, 14 GB in float32)
SPACING_RANGE_MM = (0.1, 20.0)
SHEAR_TOLERANCE = 1e-4  # largest |cos| between two sform axes still taken as a right angle
FLOAT_DATATYPES = {16, 64, 1536}  # NIfTI float32, float64, float128
# NIfTI datatypes read straight into NumPy, as the types ITK would give them; other files go through ITK.
_DIRECT_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}


@dataclass(frozen=True)
class _Header:
    """The fields of a NIfTI-1 or NIfTI-2 header that reading needs."""

    endian: str
    sizeof_hdr: int
    dims: tuple[int, ...]  # dim[1] .. dim[dim[0]]
    datatype: int
    bitpix: int
    vox_offset: int
    scl_slope: float
    scl_inter: float
    pixdim: tuple[float, ...] = ()  # pixdim[1] .. pixdim[dim[0]]
    raw: bytes = b""  # the first 348 bytes (NIfTI-1 only)

    def sform(self) -> np.ndarray | None:
        """The sform's 3 x 4 matrix (RAS, voxel index (i, j, k) -> mm) when sform_code > 0 (NIfTI-1)."""
        if len(self.raw) < 348 or struct.unpack(self.endian + "h", self.raw[254:256])[0] <= 0:
            return None
        return np.array(struct.unpack(self.endian + "12f", self.raw[280:328]), float).reshape(3, 4)

    def sheared(self) -> bool:
        """An sform whose axes are not at right angles: ITK refuses it, or reads the qform instead."""
        sform = self.sform()
        if sform is None or not np.all(np.isfinite(sform)):
            return False
        axes = sform[:, :3] / np.maximum(np.linalg.norm(sform[:, :3], axis=0), 1e-12)
        return bool(np.abs(axes.T @ axes - np.eye(3)).max() > SHEAR_TOLERANCE)

    @property
    def data_offset(self) -> int:
        return max(self.vox_offset, self.sizeof_hdr + 4)

    @property
    def file_bytes(self) -> int:
        """Uncompressed size the header implies."""
        return self.data_offset + math.prod(max(d, 1) for d in self.dims) * self.bitpix // 8

    def direct_dtype(self) -> np.dtype | None:
        """The NumPy type to read the voxels as, for a little-endian 3D file that ITK would not scale;
        None sends the file through ITK."""
        code = _DIRECT_DTYPES.get(self.datatype)
        unscaled = self.scl_slope in (0.0, 1.0) and self.scl_inter == 0.0  # NaN fails both
        if code is None or self.endian != "<" or len(self.dims) != 3 or not unscaled:
            return None
        return np.dtype("<" + code)


def _parse_header(header: bytes) -> _Header | None:
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset, slope, inter = struct.unpack(endian + "3f", header[108:120])
            pixdim = struct.unpack(endian + "8f", header[76:108])
        elif sizeof_hdr == 540 and len(header) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            slope, inter = struct.unpack(endian + "2d", header[176:192])
            pixdim = struct.unpack(endian + "8d", header[104:168])
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0:
            return None
        return _Header(endian, sizeof_hdr, tuple(int(d) for d in dims[1 : dims[0] + 1]), int(datatype),
                       int(bitpix), int(offset), float(slope), float(inter),
                       tuple(abs(float(p)) for p in pixdim[1 : dims[0] + 1]),
                       bytes(header[:348]) if sizeof_hdr == 348 else b"")
    return None


def _gzip_member_is_complete(path: Path) -> bool:
    """Decompress the whole stream once, checking its CRC and length (slow path, rarely taken)."""
    try:
        with igzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (OSError, EOFError, isal_zlib.error):
        return False
    return True


def _check_nifti_file(path: Path) -> tuple[_Header, int]:
    """Fail early and plainly where ITK would print a long stack of messages; returns the header and
    the gzip trailer's size field (what ITK's path checks, see _read_with_itk)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
            fh.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", fh.read(4))[0]  # gzip trailer: uncompressed size mod 2**32
        if magic != b"\x1f\x8b":
            raise CaseError(path, "cannot read: not gzip-compressed (expected a .nii.gz file)")
        with igzip.open(path, "rb") as fh:
            raw = fh.read(540)
    except (OSError, EOFError, isal_zlib.error) as exc:
        raise CaseError(path, f"cannot read: corrupt gzip stream ({exc})") from exc
    if len(raw) < 348:
        raise CaseError(path, "cannot read: truncated file (shorter than a NIfTI header)")
    header = _parse_header(raw)
    if header is None:
        raise CaseError(path, "cannot read: not a NIfTI file (bad header)")
    return header, isize


def _count_non_finite(path: Path) -> int:
    """ITK's NIfTI reader turns NaN into 0 without a word, so float files are checked on the raw data."""
    import nibabel

    data = np.asanyarray(nibabel.load(str(path)).dataobj)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header tells before its voxels are read: enough to budget its memory."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    read_itemsize: int  # bytes per voxel once read (and held until the case is done)


def read_header(path: Path) -> ImageHeader | None:
    """The grid of a 3D NIfTI file from its header alone (the first kilobyte of the stream), as an
    estimate's input; spacing from the sform's columns where it is set, else pixdim. None where the
    header does not describe a usable 3D grid: read_image then says what is wrong. Raises CaseError
    only as read_image would, for a file that is not a readable NIfTI at all."""
    path = Path(path)
    header, _ = _check_nifti_file(path)
    dims = list(header.dims)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3 or min(dims) < 2:
        return None
    sform = header.sform()
    if sform is not None and np.all(np.isfinite(sform)):
        spacing_xyz = tuple(float(v) for v in np.linalg.norm(sform[:, :3], axis=0))
    else:
        spacing_xyz = tuple(header.pixdim[:3])
    low, high = SPACING_RANGE_MM
    if len(spacing_xyz) != 3 or not all(low <= s <= high for s in spacing_xyz):
        return None
    itemsize = header.bitpix // 8
    if not (header.scl_slope in (0.0, 1.0) and header.scl_inter == 0.0):
        itemsize = max(itemsize, 4)  # scaled values are read as floats
    if header.sheared():
        itemsize *= 2  # nibabel's array and its (z, y, x) copy
    x, y, z = dims
    return ImageHeader((z, y, x), (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]), itemsize)


def read_image(path: Path) -> Volume:
    """Read a 3D NIfTI image as a (z, y, x) volume in the file's voxel type (float when the header
    scales the values) with ITK's geometry: a CT stays int16, half the memory and bandwidth of float32
    until preprocessing has cropped it. The array is read-only. Plain files (3D, little-endian,
    unscaled: nearly every CT and MRI) are inflated by ISA-L in one call, faster than ITK's zlib;
    ITK reads only their header. One call, not a stream, because ISA-L's streaming reader takes the
    GIL for every chunk and crawls beside a busy Python thread (the model loading while the first
    case is read). Figures: docs/benchmarks.md, engine choices.
    Every other file goes through ITK whole."""
    path = Path(path)
    header, isize = _check_nifti_file(path)
    if header.sheared():
        return _read_sheared(path, header)
    dtype = header.direct_dtype()
    if dtype is None:
        return _read_with_itk(path, header, isize)
    try:
        raw = _inflate(path)
    except (OSError, EOFError, ValueError, isal_zlib.error) as exc:
        raise CaseError(path, f"cannot read: truncated or corrupt image data ({exc})") from exc
    reader = itk().ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _itk_error(path, exc) from exc
    geometry = _geometry(path, reader, reader.GetNumberOfComponents())
    count = math.prod(geometry.shape_zyx)
    if len(raw) < header.data_offset + count * dtype.itemsize:
        raise CaseError(path, f"cannot read: truncated image data ({len(raw)} of "
                              f"{header.data_offset + count * dtype.itemsize} bytes)")
    voxels = np.frombuffer(raw, dtype, count, header.data_offset).reshape(geometry.shape_zyx)
    if dtype.kind == "f" and (bad := voxels.size - np.count_nonzero(np.isfinite(voxels))):
        raise CaseError(path, f"{bad} voxels are NaN or infinite")
    return Volume(voxels, geometry)


def _read_sheared(path: Path, header: _Header) -> Volume:
    """A grid whose sform is sheared (ITK refuses it, or silently takes the qform): nibabel reads the
    voxels (scaled as the header says), the engine works on the nearest orthonormal frame (spacing:
    the sform's column lengths; direction: its polar factor), and the output gets the input's header."""
    import nibabel

    sform = header.sform()
    try:
        image = nibabel.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for a broken file
        raise CaseError(path, f"cannot read: truncated or corrupt image data ({exc})") from exc
    if data.ndim != 3 or min(data.shape) < 2:
        raise CaseError(path, f"image of shape {data.shape}: expected a 3D volume")
    if data.dtype.kind == "f" and (bad := data.size - np.count_nonzero(np.isfinite(data))):
        raise CaseError(path, f"{bad} voxels are NaN or infinite")
    spacing = np.linalg.norm(sform[:, :3], axis=0)
    u, _, vt = np.linalg.svd(sform[:, :3] / spacing)
    lps_from_ras = np.diag([-1.0, -1.0, 1.0])
    direction, origin = lps_from_ras @ (u @ vt), lps_from_ras @ sform[:, 3]
    _check_spacing(path, spacing)
    geometry = Geometry(tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                        tuple(float(v) for v in direction.ravel()), tuple(int(n) for n in data.shape),
                        nifti_header=header.raw)
    voxels = np.ascontiguousarray(data.transpose(2, 1, 0))
    voxels.flags.writeable = False
    return Volume(voxels, geometry)


def _inflate(path: Path) -> bytes:
    """The whole decompressed file, in one ISA-L call that holds the GIL only to start and end
    (see read_image), over the file mapped into memory: no copy of the compressed bytes."""
    with open(path, "rb") as fh:
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without memory maps
            return igzip.decompress(fh.read())
        with mapped:
            compressed = memoryview(mapped)
            try:
                return igzip.decompress(compressed)
            except (OSError, EOFError, isal_zlib.error) as exc:  # OSError: gzip.BadGzipFile (CRC)
                # keep the message only: the traceback holds the decompressor, which holds the view,
                # and the view must be released before the map can close
                failure = type(exc)(str(exc))
            finally:
                compressed.release()
        raise failure


def _read_with_itk(path: Path, header: _Header, isize: int) -> Volume:
    """ITK's reader, for files read_image does not inflate itself. ITK fills the missing voxels of
    a truncated .nii.gz with zeros without a word, so the stream is checked first: the trailer's
    size (O(1)), and where it differs (a multi-member gzip file carries only its last member's size
    there) a full decompression. The direct path needs neither: its one inflate fails on a
    truncated stream."""
    if isize != header.file_bytes % 2**32 and not _gzip_member_is_complete(path):
        raise CaseError(path, "cannot read: truncated or corrupt image data (gzip stream ends early)")
    try:
        image = itk().ReadImage(str(path))
    except RuntimeError as exc:
        raise _itk_error(path, exc) from exc
    geometry = _geometry(path, image, image.GetNumberOfComponentsPerPixel())
    if header.datatype in FLOAT_DATATYPES and (bad := _count_non_finite(path)):
        raise CaseError(path, f"{bad} voxels are NaN or infinite")
    return Volume(_owning_view(image), geometry)


def _itk_error(path: Path, exc: RuntimeError) -> CaseError:
    lines = str(exc).strip().splitlines()
    detail = next((line for line in lines if "ERROR" in line or "rror" in line), lines[-1] if lines else "")
    return CaseError(path, f"cannot read: truncated or corrupt image data ({detail.strip()[:120]})")


def _geometry(path: Path, source: sitk.Image | sitk.ImageFileReader, components: int) -> Geometry:
    """The grid of an ITK image or of a reader that has read a file's header; anything but one
    value per voxel on a 3D grid is refused."""
    dim = source.GetDimension()
    if dim != 3:
        raise CaseError(path, f"{dim}D image of size {source.GetSize()}: expected a 3D volume")
    if components != 1:
        raise CaseError(path, f"{components} components per voxel: expected 1")
    if min(source.GetSize()) < 2:
        raise CaseError(path, f"image of size {source.GetSize()} is flat: expected a 3D volume")
    _check_spacing(path, source.GetSpacing())
    return Geometry(
        spacing_xyz_mm=tuple(source.GetSpacing()),
        origin_xyz_mm=tuple(source.GetOrigin()),
        direction=tuple(source.GetDirection()),
        size_xyz=tuple(source.GetSize()),
    )


def _check_spacing(path: Path, spacing_xyz_mm) -> None:
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in spacing_xyz_mm):  # NaN fails too
        raise CaseError(path, f"voxel spacing {' x '.join(f'{s:g}' for s in spacing_xyz_mm)} mm is outside any "
                              f"scanner's range ({low:g} to {high:g} mm): a broken header")


class _ImageVoxels:
    """The voxels of an ITK image as an array interface that keeps the image alive: arrays made
    from it hold this object as their base, so no copy is needed (a bare view from
    GetArrayViewFromImage dangles once the image is freed). Read-only, like that view."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        view = itk().GetArrayViewFromImage(image)
        self.__array_interface__ = {**view.__array_interface__, "data": (view.__array_interface__["data"][0], True)}


def _owning_view(image: sitk.Image) -> np.ndarray:
    return np.asarray(_ImageVoxels(image))


def read_case(case: Case) -> Volume:
    return read_image(case.path)


PARTIAL_SUFFIX = ".part"


def remove_partial_outputs(output_dir: Path, case_ids: Iterable[str]) -> None:
    """Remove what a killed run left mid-write for these cases (`.<case>.nii.gz.*.part`)."""
    for case_id in case_ids:
        for stale in Path(output_dir).glob(f".{case_id}.nii.gz.*{PARTIAL_SUFFIX}"):
            stale.unlink(missing_ok=True)


def write_labels(path: Path, labels_zyx: np.ndarray | Iterable[np.ndarray], geometry: Geometry,
                 compression_level: int = 1) -> None:
    """Write uint8 labels on the given geometry as a gzip-compressed NIfTI-1 file, atomically
    (temporary file in the same folder, then rename). ISA-L deflates (levels 0-3), several times
    faster than ITK's zlib at its fastest level (docs/benchmarks.md, engine choices).

    labels_zyx: the (z, y, x) label map, or its consecutive blocks of whole z-slices, deflated as
        they come (`export.Labels.slabs`), so the whole map need never be in memory."""
    path = Path(path)
    blocks = [labels_zyx] if isinstance(labels_zyx, np.ndarray) else labels_zyx
    # hidden and not ending in .nii.gz: the organisers' scoring takes every *.nii.gz, and a killed
    # process leaves this name behind, never a half-written <case>.nii.gz
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            deflate = isal_zlib.compressobj(compression_level, isal_zlib.DEFLATED, 16 + isal_zlib.MAX_WBITS)
            header = _label_header(geometry) if geometry.nifti_header is None else _copied_header(geometry)
            fh.write(deflate.compress(header))
            slices = 0
            for block in blocks:
                if tuple(block.shape[1:]) != geometry.shape_zyx[1:] or slices + len(block) > geometry.shape_zyx[0]:
                    raise ValueError(f"labels of shape {block.shape} do not fit the grid {geometry.shape_zyx}")
                voxels = memoryview(np.ascontiguousarray(block, dtype=np.uint8)).cast("B")
                for start in range(0, len(voxels), 1 << 24):
                    fh.write(deflate.compress(voxels[start : start + (1 << 24)]))
                slices += len(block)
            if slices != geometry.shape_zyx[0]:
                raise ValueError(f"labels of {slices} slices do not fit the grid {geometry.shape_zyx}")
            fh.write(deflate.flush())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _label_header(geometry: Geometry) -> bytes:
    """The NIfTI-1 header of a uint8 label map on `geometry` (348 bytes, then the 4-byte extension
    flag, voxels from byte 352), with the choices ITK's writer makes: qform and sform both from the
    direction, spacing and origin, code 1 (scanner); millimetres and seconds."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = lps_to_ras @ np.asarray(geometry.direction, float).reshape(3, 3)
    origin = lps_to_ras @ np.asarray(geometry.origin_xyz_mm, float)
    spacing = np.asarray(geometry.spacing_xyz_mm, float)
    (b, c, d), qfac = _quaternion(direction)
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    header[38] = ord("r")
    struct.pack_into("<8h", header, 40, 3, *geometry.size_xyz, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 2, 8)  # datatype uint8, bitpix
    struct.pack_into("<8f", header, 76, qfac, *spacing, 0, 0, 0, 0)
    struct.pack_into("<3f", header, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    header[123] = 2 | 8  # xyzt_units: millimetres, seconds
    struct.pack_into("<2h", header, 252, 1, 1)  # qform_code, sform_code
    struct.pack_into("<6f", header, 256, b, c, d, *origin)
    struct.pack_into("<12f", header, 280, *np.hstack([direction * spacing, origin[:, None]]).ravel())
    header[344:348] = b"n+1\0"
    return bytes(header) + bytes(4)


def _copied_header(geometry: Geometry) -> bytes:
    """The input's own NIfTI-1 header (its qform, sform, codes and units unchanged) made that of a
    uint8 label map: type, scaling, intensity range, data offset."""
    raw = geometry.nifti_header
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    header = bytearray(raw)
    struct.pack_into(endian + "8h", header, 40, 3, *geometry.size_xyz, 1, 1, 1, 1)
    struct.pack_into(endian + "h", header, 68, 0)  # intent_code: none
    struct.pack_into(endian + "2h", header, 70, 2, 8)  # datatype uint8, bitpix
    struct.pack_into(endian + "3f", header, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    struct.pack_into(endian + "2f", header, 124, 0.0, 0.0)  # cal_max, cal_min
    header[344:348] = b"n+1\0"
    return bytes(header) + bytes(4)


def _quaternion(direction: np.ndarray) -> tuple[tuple[float, float, float], float]:
    """The qform's (b, c, d) and qfac for a direction matrix (columns: the axes in RAS): the nearest
    rotation, with a mirrored third axis folded into qfac = -1. Of 4a², 4b², 4c², 4d² the largest is
    taken from the diagonal and the rest from it, which keeps every case free of cancellation."""
    u, _, vt = np.linalg.svd(direction)
    r = u @ vt
    qfac = 1.0
    if np.linalg.det(r) < 0:
        qfac = -1.0
        r[:, 2] *= -1
    squares = [1 + r[0, 0] + r[1, 1] + r[2, 2], 1 + r[0, 0] - r[1, 1] - r[2, 2],
               1 - r[0, 0] + r[1, 1] - r[2, 2], 1 - r[0, 0] - r[1, 1] + r[2, 2]]
    k = int(np.argmax(squares))
    s = 2.0 * math.sqrt(squares[k])  # 4 × the largest component
    if k == 0:
        a, b, c, d = s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s
    elif k == 1:
        a, b, c, d = (r[2, 1] - r[1, 2]) / s, s / 4, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s
    elif k == 2:
        a, b, c, d = (r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, s / 4, (r[1, 2] + r[2, 1]) / s
    else:
        a, b, c, d = (r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, s / 4
    sign = -1.0 if a < 0 else 1.0  # the qform stores b, c, d of the quaternion with a >= 0
    return (sign * b, sign * c, sign * d), qfac
