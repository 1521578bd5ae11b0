"""Data augmentation in torch, on whatever device the batch is on: nnU-Net v2's default pipeline.

Spatial (`spatial`): per sample, rotation (p = 0.2; uniform in +-rotation_deg about each axis, or
about z alone when the patch is flat, i.e. its largest side > 3x its z side, nnU-Net's "dummy 2D"),
scaling (p = 0.2; one factor s in scale_range, s > 1 magnifies; in-plane only for flat patches) and,
optionally, a smooth elastic deformation (p = 0.2), composed into one sampling grid and applied with
one `grid_sample` from the larger crop `sampling` provides: trilinear for the image, nearest for the
labels, so both move together. Then mirroring: each allowed axis flipped with p = 0.5.

Intensity (`intensity`), per sample, nnU-Net's probabilities and ranges: Gaussian noise (p = 0.1,
variance in [0, 0.1]), Gaussian blur (p = 0.2, sigma in [0.5, 1] voxels), multiplicative brightness
(p = 0.15, [0.75, 1.25]), contrast (p = 0.15, [0.75, 1.25], original range kept), low resolution
(p = 0.25, down to [0.5, 1] of the size by nearest, back up trilinearly), gamma on the inverted image
(p = 0.1) and on the image (p = 0.3), gamma in [0.7, 1.5] with mean and std restored.

Scalar draws use a numpy Generator, random fields a torch Generator on the batch's device: both are
seeded per rank, so every run is reproducible and torchrun ranks see different augmentations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FLAT_PATCH_RATIO = 3.0  # nnU-Net's ANISO_THRESHOLD: flatter patches are augmented in-plane only
ELASTIC_CONTROL_SPACING_VOX = 16  # control points of the elastic field: smooth at the organ scale
ELASTIC_MAGNITUDE_VOX = 4.0  # standard deviation of the control points' displacement


@dataclass(frozen=True)
class SpatialSettings:
    rotation_deg: float = 30.0
    scale_range: tuple[float, float] = (0.7, 1.4)
    elastic: bool = False
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_rotation: float = 0.2
    p_scaling: float = 0.2
    p_elastic: float = 0.2


def is_flat(patch_zyx: tuple[int, ...]) -> bool:
    return max(patch_zyx) / patch_zyx[0] > FLAT_PATCH_RATIO


def rotation_matrix_zyx(angles_rad: tuple[float, float, float]) -> np.ndarray:
    """Rotation about the z, y and x axes, in that order, acting on (z, y, x) vectors."""
    a, b, c = angles_rad
    about_z = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    about_y = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    about_x = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return about_x @ about_y @ about_z


def spatial_margin(patch_zyx: tuple[int, int, int], settings: SpatialSettings) -> tuple[int, int, int]:
    """Voxels to add on each side of the patch so that any rotated, scaled (and deformed) patch
    stays within the crop. Found by trying the extreme angles, which is exact for a box."""
    half = np.asarray(patch_zyx, dtype=np.float64) / 2
    limit = math.radians(settings.rotation_deg)
    steps = np.linspace(-limit, limit, 7)
    angle_sets = [(a, 0.0, 0.0) for a in steps] if is_flat(patch_zyx) else list(itertools.product(steps, repeat=3))
    extent = half.copy()
    for angles in angle_sets:
        extent = np.maximum(extent, np.abs(rotation_matrix_zyx(angles)) @ half)
    extent = extent / min(settings.scale_range[0], 1.0)
    if is_flat(patch_zyx):
        extent[0] = half[0]  # neither rotated nor scaled along z
    if settings.elastic:
        extent += 3 * ELASTIC_MAGNITUDE_VOX
    return tuple(int(math.ceil(e - h)) for e, h in zip(extent, half, strict=True))


def _offsets(size: int, device: torch.device) -> torch.Tensor:
    """Voxel-centre offsets from the centre of an axis of `size` voxels."""
    return torch.arange(size, device=device, dtype=torch.float32) + 0.5 - size / 2


def _elastic_field(patch_zyx: tuple[int, ...], flat: bool, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(z, y, x, 3) smooth random displacement in voxels: random control points, upsampled."""
    coarse = [max(2, math.ceil(p / ELASTIC_CONTROL_SPACING_VOX) + 1) for p in patch_zyx]
    field = torch.randn((1, 3, *coarse), generator=gen, device=device) * ELASTIC_MAGNITUDE_VOX
    if flat:
        field[:, 0] = 0
    field = F.interpolate(field, size=tuple(patch_zyx), mode="trilinear", align_corners=True)
    return field[0].permute(1, 2, 3, 0)


def sample_grid(
    patch_zyx: tuple[int, int, int],
    region_zyx: tuple[int, ...],
    matrix_zyx: np.ndarray,
    displacement: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """grid_sample grid (1, z, y, x, 3) in (x, y, z) order mapping patch voxels into the region:
    input offset = matrix @ output offset (+ displacement), both from the common centre."""
    zz, yy, xx = torch.meshgrid(*(_offsets(p, device) for p in patch_zyx), indexing="ij")
    offsets = torch.stack([zz, yy, xx], -1)
    coords = offsets @ torch.as_tensor(matrix_zyx, dtype=torch.float32, device=device).T
    if displacement is not None:
        coords = coords + displacement
    coords = coords / (torch.tensor(region_zyx, dtype=torch.float32, device=device) / 2)
    return coords.flip(-1)[None]


def centre_crop(array: torch.Tensor, patch_zyx: tuple[int, ...]) -> torch.Tensor:
    starts = [(r - p) // 2 for r, p in zip(array.shape[-3:], patch_zyx, strict=True)]
    return array[(..., *(slice(s, s + p) for s, p in zip(starts, patch_zyx, strict=True)))]


def spatial(
    images: torch.Tensor,
    labels: torch.Tensor,
    patch_zyx: tuple[int, int, int],
    settings: SpatialSettings,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, c, *region) images and (b, *region) integer labels -> (b, c, *patch), (b, *patch)."""
    flat = is_flat(patch_zyx)
    region = tuple(images.shape[2:])
    out_images, out_labels = [], []
    for i in range(images.shape[0]):
        matrix = np.eye(3)
        changed = False
        if rng.random() < settings.p_rotation and settings.rotation_deg > 0:
            limit = math.radians(settings.rotation_deg)
            angles = rng.uniform(-limit, limit, 3)
            if flat:
                angles[1:] = 0
            matrix = rotation_matrix_zyx(tuple(angles)) @ matrix
            changed = True
        if rng.random() < settings.p_scaling and settings.scale_range != (1.0, 1.0):
            scale = rng.uniform(*settings.scale_range)
            matrix = matrix @ np.diag([1.0 if flat else 1 / scale, 1 / scale, 1 / scale])
            changed = True
        displacement = None
        if settings.elastic and rng.random() < settings.p_elastic:
            displacement = _elastic_field(patch_zyx, flat, gen, images.device)
            changed = True
        if changed:
            grid = sample_grid(patch_zyx, region, matrix, displacement, images.device)
            image = F.grid_sample(images[i:i + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
            label = F.grid_sample(labels[i:i + 1, None].float(), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=False)[0, 0].to(labels.dtype)
        else:
            image, label = centre_crop(images[i], patch_zyx), centre_crop(labels[i], patch_zyx)
        for axis in settings.mirror_axes:
            if rng.random() < 0.5:
                image, label = image.flip(axis + 1), label.flip(axis)
        out_images.append(image)
        out_labels.append(label)
    return torch.stack(out_images), torch.stack(out_labels)


def _gaussian_blur(x: torch.Tensor, sigma_zyx: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of a (c, z, y, x) tensor, edges replicated."""
    for axis, sigma in enumerate(sigma_zyx):
        if sigma <= 0:
            continue
        radius = max(1, int(math.ceil(3 * sigma)))
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        channels = x.shape[0]
        padded = F.pad(x[None], pad, mode="replicate")
        x = F.conv3d(padded, kernel.reshape(shape).expand(channels, 1, *shape[2:]), groups=channels)[0]
    return x


def _gamma(x: torch.Tensor, gamma: float, invert: bool) -> torch.Tensor:
    if invert:
        x = -x
    mean, std = x.mean(), x.std()
    low, high = x.min(), x.max()
    x = ((x - low) / (high - low).clamp_min(1e-7)) ** gamma * (high - low) + low
    x = (x - x.mean()) / x.std().clamp_min(1e-7) * std + mean  # retain the statistics, as nnU-Net does
    return -x if invert else x


def intensity(images: torch.Tensor, patch_flat: bool, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """nnU-Net's intensity transforms on a (b, c, z, y, x) batch; returns a new tensor."""
    out = []
    for x in images:
        if rng.random() < 0.1:
            std = math.sqrt(rng.uniform(0, 0.1))
            x = x + torch.randn(x.shape, generator=gen, device=x.device) * std
        if rng.random() < 0.2:
            sigma = [rng.uniform(0.5, 1.0) for _ in range(3)]
            if patch_flat:
                sigma[0] = 0.0
            x = torch.stack([_gaussian_blur(ch[None], tuple(sigma))[0] if rng.random() < 0.5 else ch for ch in x])
        if rng.random() < 0.15:
            x = x * rng.uniform(0.75, 1.25)
        if rng.random() < 0.15:
            low, high, mean = x.min(), x.max(), x.mean()
            x = ((x - mean) * rng.uniform(0.75, 1.25) + mean).clamp(low, high)
        if rng.random() < 0.25:
            zoom = rng.uniform(0.5, 1.0)
            size = [max(1, round(s * (1.0 if (patch_flat and a == 0) else zoom))) for a, s in enumerate(x.shape[1:])]
            small = F.interpolate(x[None], size=size, mode="nearest")
            x = F.interpolate(small, size=tuple(x.shape[1:]), mode="trilinear", align_corners=False)[0]
        if rng.random() < 0.1:
            x = _gamma(x, rng.uniform(0.7, 1.5), invert=True)
        if rng.random() < 0.3:
            x = _gamma(x, rng.uniform(0.7, 1.5), invert=False)
        out.append(x)
    return torch.stack(out)
