"""Small real NIfTI files for tests, written with SimpleITK."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

RAS = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)  # RAS+ files read by ITK (LPS) flip x and y
LPS = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def oblique(angle_deg: float = 17.0) -> tuple[float, ...]:
    a = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(angle_deg / 2)
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def write_image(
    path: Path,
    array_zyx: np.ndarray,
    *,
    spacing_xyz=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0),
    direction=LPS,
) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(image, str(path), True)
    return Path(path)


def ct_like(shape_zyx: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Air around an elliptic body with a bright and a dark blob: enough structure for a network."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    image = np.where(body, 40.0, -1000.0)
    image[(x - 0.3) ** 2 + y**2 + z**2 < 0.1] = 150.0
    image[(x + 0.3) ** 2 + (y + 0.2) ** 2 + z**2 < 0.05] = -80.0
    return (image + rng.normal(0, 10, shape_zyx)).astype(np.int16)
