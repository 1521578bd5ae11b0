"""docs/phantoms.png: axial and coronal mid slices of generated cases (CT window, MRI), for a look.

    .venv/bin/python -m tests.make_phantom_figure
Writes the PNG with numpy and zlib only (no plotting library in the project)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage

from flarebox.phantoms import generate_case

ROOT = Path(__file__).resolve().parents[1]


def write_png(path: Path, rgb: np.ndarray) -> None:
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))


def panel(image: np.ndarray, labels: np.ndarray, aspect: float, window: tuple[float, float], size: int = 256):
    """One slice as RGB with organ contours; `aspect` = row spacing / column spacing."""
    low, high = window
    gray = np.clip((image - low) / (high - low), 0, 1)
    zoom = (size * aspect / image.shape[0] * image.shape[0] / max(image.shape[0] * aspect, image.shape[1]),
            size / max(image.shape[0] * aspect, image.shape[1]))
    gray = ndimage.zoom(gray, zoom, order=1)
    labels = ndimage.zoom(labels, zoom, order=0)
    rgb = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2)
    edges = labels != ndimage.grey_erosion(labels, size=3)
    colours = np.random.default_rng(3).integers(60, 255, size=(256, 3), dtype=np.uint8)
    rgb[edges & (labels > 0)] = colours[labels[edges & (labels > 0)]]
    out = np.zeros((size, size, 3), np.uint8)
    out[: rgb.shape[0], : rgb.shape[1]] = rgb[:size, :size]
    return out


def main() -> None:
    rows = []
    for seed, modality in ((0, "ct"), (1, "ct"), (2, "ct"), (4, "t1")):
        p = generate_case(seed, modality=modality, orientation="lps", spacing_zyx_mm=(2.0, 1.2, 1.2))
        z, y, x = (n // 2 for n in p.image_zyx.shape)
        window = (-160, 240) if modality == "ct" else (0, float(np.percentile(p.image_zyx, 99.5)))
        sz, sy, _ = p.spacing_zyx_mm
        kidney_z = int(np.argmax(np.bincount(np.nonzero(p.organs_zyx == 2)[0]))) if (p.organs_zyx == 2).any() else z
        axial = panel(p.image_zyx[kidney_z], p.organs_zyx[kidney_z], 1.0, window)
        upper = panel(p.image_zyx[int(z * 1.3)], p.organs_zyx[int(z * 1.3)], 1.0, window)
        coronal = panel(p.image_zyx[::-1, y], p.organs_zyx[::-1, y], sz / sy, window)
        rows.append(np.concatenate([axial, upper, coronal], axis=1))
    write_png(ROOT / "docs" / "phantoms.png", np.concatenate(rows, axis=0))


if __name__ == "__main__":
    main()
