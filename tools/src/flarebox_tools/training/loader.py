"""Training batches as a pure function of the step: sampled, augmented, in a worker process.

Batch `step` of rank `rank` is drawn with generators seeded from (seed, rank, step) alone, so the
sampler has no state to carry: a resumed run (or a run with more or fewer workers) draws exactly
the batches an uninterrupted one would, and torchrun ranks still see different batches.

`batches(...)` yields them from `start_step` on through torch's own DataLoader, which makes them in
`workers` background processes (sampling crops from the memory-mapped cache, spatial and intensity
augmentation on the CPU) while the main process runs the optimiser step; workers = 0 makes them
inline. On CUDA the batches arrive in pinned memory for an asynchronous copy.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from flarebox_tools.training.augment import SpatialSettings, centre_crop, intensity, is_flat, spatial
from flarebox_tools.training.data import TrainingCase
from flarebox_tools.training.sampling import sample_batch


@dataclass(frozen=True)
class BatchRecipe:
    """Everything a batch depends on besides its step."""

    cases: list[TrainingCase]
    batch_size: int  # this rank's share
    patch_zyx: tuple[int, int, int]
    margin_zyx: tuple[int, int, int]
    oversampling: float
    settings: SpatialSettings
    spatial_augmentation: bool
    intensity_augmentation: bool
    seed: int
    rank: int
    unlabelled: list[TrainingCase] = field(default_factory=list)  # for cross pseudo supervision
    unlabelled_share: float = 0.0


@dataclass(frozen=True)
class TrainingBatch:
    images: torch.Tensor  # (b, c, *patch) float32
    labels: torch.Tensor  # (b, *patch) int64
    case_ids: tuple[str, ...]

    def pin_memory(self) -> TrainingBatch:  # DataLoader's pin_memory calls this
        return TrainingBatch(self.images.pin_memory(), self.labels.pin_memory(), self.case_ids)


def make_batch(recipe: BatchRecipe, step: int) -> TrainingBatch:
    """Batch `step`, identical wherever and whenever it is made."""
    rng = np.random.default_rng([recipe.seed, recipe.rank, step])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    batch = sample_batch(recipe.cases, recipe.batch_size, recipe.patch_zyx, rng,
                         oversampling=recipe.oversampling, margin_zyx=recipe.margin_zyx,
                         unlabelled=recipe.unlabelled, unlabelled_share=recipe.unlabelled_share)
    x, y = torch.from_numpy(batch.images), torch.from_numpy(batch.labels).long()
    if recipe.spatial_augmentation:
        x, y = spatial(x, y, recipe.patch_zyx, recipe.settings, rng, gen)
    else:
        x, y = centre_crop(x, recipe.patch_zyx).contiguous(), centre_crop(y, recipe.patch_zyx).contiguous()
    if recipe.intensity_augmentation:
        x = intensity(x, is_flat(recipe.patch_zyx), rng, gen)
    return TrainingBatch(x, y, batch.case_ids)


class _Steps(torch.utils.data.Dataset):
    def __init__(self, recipe: BatchRecipe) -> None:
        self.recipe = recipe

    def __getitem__(self, step: int) -> TrainingBatch:
        return make_batch(self.recipe, step)


def _worker_init(_: int) -> None:
    # a worker shares the cores with the step: one thread each keeps them from fighting
    torch.set_num_threads(1)
    # a signal to the whole process group (Ctrl-C, a group kill) is for the main process to handle:
    # it saves the step it reached, then ends the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batches(recipe: BatchRecipe, start_step: int, stop_step: int, *, workers: int = 1,
            pin_memory: bool = False, prefetch: int = 2) -> Iterator[TrainingBatch]:
    """Batches start_step, start_step + 1, ..., stop_step - 1, in order."""
    steps = range(start_step, stop_step)
    if workers == 0:
        return (make_batch(recipe, step) for step in steps)
    loader = torch.utils.data.DataLoader(
        _Steps(recipe), batch_size=None, sampler=steps, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=prefetch, worker_init_fn=_worker_init, multiprocessing_context="fork",
        collate_fn=lambda b: b)
    return iter(loader)
