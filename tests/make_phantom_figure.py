"""docs/phantoms.png: axial and coronal slices of generated cases, for a look by eye.

    .venv/bin/python -m tests.make_phantom_figure

Rows: three CT cases (synthetic anatomy in the arterial and portal-venous phase, the deformed real
label map without contrast) in a soft-tissue window (W 400, L 40), and one T2-like MRI. Columns: an
axial slice through the upper abdomen, the same slice with organ contours (lesions in red), an axial
slice at the kidneys with contours, and a coronal slice with contours. Slices are shown the
radiologists' way: the patient's right on the image's left, front at the top, head at the top.
Written with numpy and zlib only (no plotting library in the project).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage

from flarebox_tools.phantoms import Phantom, generate_case

ROOT = Path(__file__).resolve().parents[1]
PANEL = 300  # pixels per panel side
# one colour per organ label 1..13 (liver, right kidney, spleen, pancreas, aorta, IVC, adrenals,
# gallbladder, esophagus, stomach, duodenum, left kidney)
COLOURS = np.array([[0, 0, 0], [80, 140, 255], [255, 170, 40], [60, 220, 220], [255, 230, 90], [255, 80, 200],
                    [120, 255, 120], [255, 140, 140], [200, 120, 255], [90, 255, 200], [170, 200, 60],
                    [160, 120, 255], [255, 200, 150], [40, 200, 90]], np.uint8)
LESION = np.array([255, 30, 30], np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An 8-bit RGB PNG."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))


def radiological(p: Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, organs and lesions as (z, y, x) with x towards the patient's left, y to the back, z up
    (exact for LPS and RAS grids, the axis flips of any other diagonal direction)."""
    signs = np.sign(np.diag(np.reshape(p.direction, (3, 3))))
    flip = tuple(slice(None, None, -1 if s < 0 else 1) for s in signs[::-1])
    return p.image_zyx[flip], p.organs_zyx[flip], p.lesions_zyx[flip]


def panel(image: np.ndarray, organs: np.ndarray | None, lesions: np.ndarray | None, window: tuple[float, float],
          row_over_col_mm: float) -> np.ndarray:
    """One slice as a PANEL x PANEL RGB tile with contours; rows stretched to millimetres."""
    low, high = window
    scale = PANEL / max(image.shape[0] * row_over_col_mm, image.shape[1])
    zoom = (scale * row_over_col_mm, scale)
    grey = ndimage.zoom(np.clip((image.astype(np.float32) - low) / (high - low), 0, 1), zoom, order=1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    if organs is not None:
        labels = ndimage.zoom(organs, zoom, order=0)
        edges = (labels != ndimage.grey_erosion(labels, size=2)) & (labels > 0)
        rgb[edges] = COLOURS[labels[edges]]
        marks = ndimage.zoom(lesions, zoom, order=0).astype(bool)
        rgb[marks & ~ndimage.binary_erosion(marks)] = LESION
    tile = np.zeros((PANEL, PANEL, 3), np.uint8)
    top, left = (PANEL - rgb.shape[0]) // 2, (PANEL - rgb.shape[1]) // 2
    tile[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb[:PANEL, :PANEL]
    return tile


def row(p: Phantom) -> np.ndarray:
    image, organs, lesions = radiological(p)
    sz, sy, sx = p.spacing_zyx_mm
    window = (-160.0, 240.0) if p.modality == "ct" else (0.0, float(np.percentile(image, 99.5)))
    z_liver = np.flatnonzero((organs == 1).any(axis=(1, 2)))
    z_kidney = np.flatnonzero(np.isin(organs, (2, 13)).any(axis=(1, 2)))
    upper = int(z_liver[len(z_liver) * 3 // 5]) if len(z_liver) else image.shape[0] * 2 // 3
    kidneys = int(z_kidney[len(z_kidney) // 2]) if len(z_kidney) else image.shape[0] // 3
    aorta_y = np.flatnonzero((organs == 5).any(axis=(0, 2)))
    coronal = int(aorta_y.mean()) + 6 if len(aorta_y) else image.shape[1] // 2
    return np.concatenate([
        panel(image[upper], None, None, window, sy / sx),
        panel(image[upper], organs[upper], lesions[upper], window, sy / sx),
        panel(image[kidneys], organs[kidneys], lesions[kidneys], window, sy / sx),
        panel(image[::-1, coronal], organs[::-1, coronal], lesions[::-1, coronal], window, sz / sx),
    ], axis=1)


def main() -> None:
    cases = [
        generate_case(2, phase="arterial", orientation="lps", spacing_zyx_mm=(2.0, 0.8, 0.8), n_lesions=3),
        generate_case(5, phase="portal-venous", orientation="ras", spacing_zyx_mm=(2.5, 0.9, 0.9)),
        generate_case(3, anatomy="template", phase="non-contrast", orientation="lps", spacing_zyx_mm=(2.0, 0.8, 0.8)),
        generate_case(2, modality="t2", orientation="lps", spacing_zyx_mm=(2.0, 0.8, 0.8), n_lesions=3),
    ]
    gap = np.full((4, PANEL * 4, 3), 255, np.uint8)
    rows = [part for p in cases for part in (row(p), gap)][:-1]
    write_png(ROOT / "docs" / "phantoms.png", np.concatenate(rows, axis=0))


if __name__ == "__main__":
    main()
