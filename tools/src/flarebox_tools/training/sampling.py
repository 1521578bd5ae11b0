"""Patch sampling with nnU-Net's foreground oversampling.

Each sample of a batch comes from a uniformly chosen training case. With probability
`oversampling` (nnU-Net: 0.33) it is forced to hold foreground: one of the foreground classes
present in that case is chosen uniformly (class-balanced, so a small organ is as likely as the
liver), then one of its voxels, and the patch is placed so that the voxel lands anywhere in it,
uniformly (clipped to the image). nnU-Net centres the patch on the voxel instead; then a small
structure always sits at the patch's centre, and the network learns that: the Task 1 demo found
half of a centred lesion's voxels but a tenth through the sliding window, whose tiles sit wherever
they fall, and marked lesion at tile centres (docs/training.md). Otherwise the patch lies anywhere
inside the image (along an axis where the image is smaller than the patch, the
image lies anywhere inside the patch). This is nnU-Net's `probabilistic_oversampling`; its default
instead forces the last round(0.33 * batch) samples of a batch, which is 50 % for a batch of 2 and
0 % for a torchrun rank holding 1.

The crop returned is a region larger than the patch by `margin_zyx` on each side, centred on the
patch, so that rotation and scaling in `augment` sample real image content rather than zero padding
in the patch corners. Voxels outside the image are 0 in the image (the normalised mean) and
background in the labels, as in nnU-Net.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flarebox_tools.training.data import TrainingCase


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # (b, c, *region) float32
    labels: np.ndarray  # (b, *region) uint8
    case_ids: tuple[str, ...]
    forced_class: tuple[int, ...]  # the class a sample was forced to contain; 0 = a random patch


def patch_start(shape_zyx: tuple[int, ...], patch_zyx: tuple[int, ...], rng: np.random.Generator,
                voxel_zyx: np.ndarray | None) -> np.ndarray:
    """Start corner of a patch: random, or holding `voxel_zyx` at a uniformly random place in it;
    may be negative (padding)."""
    shape, patch = np.asarray(shape_zyx), np.asarray(patch_zyx)
    pad = np.maximum(patch - shape, 0)
    low = -(pad // 2)  # an image smaller than the patch sits anywhere inside it, as in nnU-Net
    high = shape + pad // 2 + pad % 2 - patch
    if voxel_zyx is None:
        return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high, strict=True)])
    offset = np.array([rng.integers(0, p) for p in patch])  # where in the patch the voxel lands
    return np.clip(np.asarray(voxel_zyx) - offset, low, high)


def crop(array: np.ndarray, start_zyx: np.ndarray, size_zyx: tuple[int, ...]) -> np.ndarray:
    """array[..., start:start+size] over the last three axes, zero outside the array."""
    lead = array.shape[:-3]
    out = np.zeros((*lead, *size_zyx), dtype=array.dtype)
    shape = array.shape[-3:]
    src, dst = [], []
    for a, s, n in zip(start_zyx, size_zyx, shape, strict=True):
        lo, hi = max(0, int(a)), min(n, int(a) + s)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(a), hi - int(a)))
    out[(..., *dst)] = array[(..., *src)]
    return out


def sample_batch(
    cases: list[TrainingCase],
    batch_size: int,
    patch_zyx: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    oversampling: float = 0.33,
    margin_zyx: tuple[int, int, int] = (0, 0, 0),
    unlabelled: Sequence[TrainingCase] = (),
    unlabelled_share: float = 0.0,
) -> Batch:
    """A batch of crops of size patch + 2 * margin, each centred on its sampled patch; each sample
    from `unlabelled` cases with probability `unlabelled_share` (cross pseudo supervision), else
    from `cases`."""
    margin = np.asarray(margin_zyx)
    region = tuple(int(p + 2 * m) for p, m in zip(patch_zyx, margin, strict=True))
    images, labels, ids, forced = [], [], [], []
    for _ in range(batch_size):
        pool = unlabelled if unlabelled and rng.random() < unlabelled_share else cases
        case = pool[int(rng.integers(len(pool)))]
        voxel, label = None, 0
        if rng.random() < oversampling and case.class_locations:
            label = int(rng.choice(sorted(case.class_locations)))
            locations = case.class_locations[label]
            voxel = locations[int(rng.integers(len(locations)))]
        start = patch_start(case.labels.shape, patch_zyx, rng, voxel) - margin
        images.append(crop(case.image, start, region))
        labels.append(crop(case.labels, start, region))
        ids.append(case.case_id)
        forced.append(label)
    return Batch(np.stack(images), np.stack(labels), tuple(ids), tuple(forced))


def rank_batch_size(global_batch: int, rank: int, world: int) -> int:
    """This rank's share of the global batch (the first ranks take one more when it does not divide)."""
    if global_batch < world:
        raise ValueError(f"batch size {global_batch} is smaller than the number of processes ({world})")
    return global_batch // world + (1 if rank < global_batch % world else 0)
