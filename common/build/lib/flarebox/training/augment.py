"""Data augmentation in torch (CPU or GPU): nnU-Net's spatial and intensity transforms, simplified.

Spatial: rotation about the axial axis and isotropic scaling (p = 0.2 each, one resampling for
both: bilinear image, nearest labels), mirroring along each axis (p = 0.5). Intensity: Gaussian
noise (p = 0.1), brightness (p = 0.15), contrast (p = 0.15), gamma (p = 0.3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def spatial(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    b = images.shape[0]
    theta = torch.zeros(b, 3, 4, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1
    changed = False
    for i in range(b):
        angle = (torch.rand(1, generator=gen).item() * 2 - 1) * math.pi / 6 if torch.rand(1, generator=gen) < 0.2 else 0
        scale = 0.7 + 0.7 * torch.rand(1, generator=gen).item() if torch.rand(1, generator=gen) < 0.2 else 1.0
        if angle or scale != 1.0:
            changed = True
            c, s = math.cos(angle) / scale, math.sin(angle) / scale
            theta[i, 0, 0], theta[i, 0, 1], theta[i, 1, 0], theta[i, 1, 1] = c, -s, s, c  # grid order (x, y, z)
            theta[i, 2, 2] = 1 / scale
    if changed:
        grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long()
    for axis in (2, 3, 4):
        flip = torch.rand(b, generator=gen) < 0.5
        if flip.any():
            idx = flip.nonzero()[:, 0].to(images.device)
            images[idx] = images[idx].flip(axis)
            labels[idx] = labels[idx].flip(axis - 1)
    return images, labels


def intensity(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = images.shape[0]
    for i in range(b):
        x = images[i]
        if torch.rand(1, generator=gen) < 0.1:
            x = x + torch.randn(x.shape, generator=gen).to(x) * 0.1 * torch.rand(1, generator=gen).item()
        if torch.rand(1, generator=gen) < 0.15:
            x = x * (0.75 + 0.5 * torch.rand(1, generator=gen).item())
        if torch.rand(1, generator=gen) < 0.15:
            mean = x.mean()
            x = (x - mean) * (0.75 + 0.5 * torch.rand(1, generator=gen).item()) + mean
        if torch.rand(1, generator=gen) < 0.3:
            low, high = x.min(), x.max()
            gamma = 0.7 + 0.8 * torch.rand(1, generator=gen).item()
            x = ((x - low) / (high - low + 1e-7)) ** gamma * (high - low) + low
        images[i] = x
    return images
