"""Patch sampling with nnU-Net's foreground oversampling."""

from __future__ import annotations

import numpy as np

from flarebox.training.data import Sample


def foreground_index(samples: list[Sample]) -> list[dict[int, np.ndarray]]:
    """Per sample and class, up to 2000 voxel coordinates to centre foreground patches on."""
    rng = np.random.default_rng(0)
    index = []
    for sample in samples:
        per_class = {}
        for label in np.unique(sample.labels):
            if label == 0:
                continue
            coords = np.argwhere(sample.labels == label)
            if len(coords) > 2000:
                coords = coords[rng.choice(len(coords), 2000, replace=False)]
            per_class[int(label)] = coords
        index.append(per_class)
    return index


def sample_patch(sample: Sample, classes: dict[int, np.ndarray], patch_zyx: tuple[int, ...],
                 rng: np.random.Generator, force_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
    """One (c, *patch) image and (*patch) label patch; zero-padded where the case is smaller."""
    shape = np.array(sample.labels.shape)
    patch = np.array(patch_zyx)
    if force_foreground and classes:
        label = int(rng.choice(sorted(classes)))  # classes equally likely, as nnU-Net samples them
        centre = classes[label][rng.integers(len(classes[label]))]
        start = centre - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1)
    else:
        start = np.array([rng.integers(min(0, s - p), max(0, s - p) + 1) for s, p in zip(shape, patch, strict=True)])
    start = np.clip(start, np.minimum(0, shape - patch), np.maximum(0, shape - patch))
    image = np.zeros((sample.image.shape[0], *patch_zyx), np.float32)
    labels = np.zeros(patch_zyx, np.uint8)
    src = tuple(slice(max(0, a), min(s, a + p)) for a, s, p in zip(start, shape, patch, strict=True))
    dst = tuple(slice(max(0, -a), max(0, -a) + (r.stop - r.start)) for a, r in zip(start, src, strict=True))
    image[(slice(None), *dst)] = sample.image[(slice(None), *src)]
    labels[dst] = sample.labels[src]
    return image, labels


def sample_batch(samples: list[Sample], index: list[dict[int, np.ndarray]], batch_size: int,
                 patch_zyx: tuple[int, ...], rng: np.random.Generator, oversampling: float):
    """A batch where the last round(batch * oversampling) patches (at least one) hold foreground."""
    n_forced = max(1, int(round(batch_size * oversampling))) if oversampling > 0 else 0
    images, labels = [], []
    for b in range(batch_size):
        i = int(rng.integers(len(samples)))
        image, label = sample_patch(samples[i], index[i], patch_zyx, rng, b >= batch_size - n_forced)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)
