"""The memory budget: what a case will need, told by its header before its voxels are read.

Under the organisers' `docker run -m` limit the kernel kills the whole process when one case takes
too much, and every case after it is lost. So each case's need is estimated from its NIfTI header
(grid size, voxel type, spacing) and the model's plan (target spacing, classes, tile), and
`run_folder` refuses a case that cannot fit, and reads the next case ahead only when both fit.

The estimate counts the large arrays of the data path (the read voxels, the float32 crop and its
resampled copy, the padded network input, the sliding window's band, the labels on both grids) with
a margin, and is checked against measured peaks by `make bench-memory` (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from flarebox.config import TaskConfig, load_config
from flarebox.io import ImageHeader, read_header
from flarebox.models import ModelPlan, load_plan
from flarebox.preprocess import forced_spacing, target_shape

GB = 2**30
MIND_WORK_CHANNELS = 12 + 6  # the 12 MIND-SSC channels and the distances they are made from
MARGIN = 1.25  # over the counted arrays: allocator slack, temporaries of the resampling
SLACK_BYTES = 192 * 2**20  # per case: tile buffers, compiled tile shapes, the gzip stream's buffers

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def cgroup_limit_bytes(paths: tuple[str, ...] = _CGROUP_LIMITS) -> int | None:
    """The container's memory limit (cgroup v2, then v1); None where there is none."""
    for path in paths:
        try:
            text = Path(path).read_text().strip()
            value = None if text == "max" else int(text)
        except (OSError, ValueError):
            continue
        return value if value is not None and value < 2**60 else None  # v1: 'no limit' is a huge number
    return None


def machine_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def limit_bytes(configured_gb: float = 0.0) -> tuple[int, str]:
    """The budget and where it comes from: the configuration, else the container's cgroup limit,
    else the machine's memory."""
    if configured_gb > 0:
        return int(configured_gb * GB), "configured"
    limit = cgroup_limit_bytes()
    if limit is not None:
        return min(limit, machine_bytes()), "container limit"
    return machine_bytes(), "machine memory"


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere: no budget is then enforced
    beyond the limit itself)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


@dataclass(frozen=True)
class Need:
    """A case's estimated memory beyond the process's base: its read voxels, and the work on top."""

    read: int
    work: int

    @property
    def total(self) -> int:
        return self.read + self.work


def _network_grid(header: ImageHeader, plan: ModelPlan, config: TaskConfig) -> tuple[int, ...]:
    tf = plan.transpose_forward
    shape = tuple(header.shape_zyx[a] for a in tf)
    spacing = tuple(header.spacing_zyx_mm[a] for a in tf)
    target = plan.spacing_zyx_mm
    if config.preprocess.forced_spacing:
        target = forced_spacing(spacing, target, header.shape_zyx[0])
    return target_shape(shape, spacing, target)


def _model_work(header: ImageHeader, plan: ModelPlan, config: TaskConfig, ensembled: bool) -> int:
    """Bytes one model's pass needs on top of the read voxels (no crop assumed: a header does not
    tell where the body is)."""
    n_in = math.prod(header.shape_zyx)
    grid = _network_grid(header, plan, config)
    n_net = math.prod(grid)
    patch = plan.patch_zyx
    padded = [max(n, p) for n, p in zip(grid, patch, strict=True)]
    n_pad = math.prod(padded)
    k = plan.num_classes
    channels = MIND_WORK_CHANNELS if plan.input_features == "mind" else plan.num_input_channels
    # preprocessing: a float32 copy of the crop (a CT: only its slices resampled in-plane, slab by
    # slab) and the resampled grid, twice while the last axis is resampled
    ct_by_slabs = plan.normalizations[0].scheme == "CTNormalization" and not plan.use_mask_for_norm[0]
    first = header.shape_zyx[plan.transpose_forward[0]]
    preprocess = 4 * ((first * grid[1] * grid[2] if ct_by_slabs else n_in) + 2 * channels * n_net)
    logits = ensembled or config.export.mode == "logits"
    band = 4 * (k + 1) * patch[0] * padded[1] * padded[2]
    out = 4 * k * n_pad if logits else n_pad
    infer = 4 * channels * (n_net + n_pad) + band + out
    # back to the input's grid: labels there (streamed into the write in 'labels' mode, but counted),
    # and in 'logits' mode the logits kept while one slab at a time is resampled
    export = n_in + (4 * k * n_net if logits else n_net)
    return max(preprocess, infer, export)


def estimate(header: ImageHeader, plans: list[ModelPlan], config: TaskConfig,
             gate: tuple[list[ModelPlan], TaskConfig] | None = None) -> Need:
    """A case's need, from its header: the read voxels and the most that one step on top of them takes."""
    n_in = math.prod(header.shape_zyx)
    ensembled = len(plans) > 1
    work = max(_model_work(header, plan, config, ensembled) for plan in plans)
    if ensembled:  # the running sum of the members' logits
        work += 4 * plans[0].num_classes * math.prod(_network_grid(header, plans[0], config))
    if gate is not None:  # the gate runs after the model, whose labels wait meanwhile
        gate_plans, gate_config = gate
        work = max(work, n_in + estimate(header, gate_plans, gate_config).work)
    work += n_in  # the previous case's labels, still being written
    return Need(read=n_in * header.read_itemsize, work=int(work * MARGIN) + SLACK_BYTES)


def describe(need_bytes: int, in_use: int, limit: int, source: str) -> str:
    return (f"needs about {need_bytes / GB:.1f} GB beside the {in_use / GB:.1f} GB in use, over the "
            f"{limit / GB:.1f} GB {source}: not processed (see [inference] memory_limit_gb)")


class Budget:
    """The memory budget of one run: a case's need from its header, checked against the limit
    with what the process holds at that moment (models, the case in flight, the write behind)."""

    def __init__(self, plans: list[ModelPlan], config: TaskConfig,
                 gate: tuple[list[ModelPlan], TaskConfig] | None = None) -> None:
        self.plans, self.config, self.gate = plans, config, gate
        self.limit, self.source = limit_bytes(config.inference.memory_limit_gb)
        self._needs: dict[Path, Need | None] = {}  # a header is read once, though asked about twice

    @classmethod
    def from_config(cls, config: TaskConfig) -> Budget:
        """From the plans alone (JSON, milliseconds): known before the models load."""
        def plans(cfg: TaskConfig) -> list[ModelPlan]:
            return [load_plan(folder, cfg.model.configuration) for folder in (cfg.model.folder, *cfg.model.ensemble)]

        gate = None
        if config.postprocess.gate_config is not None:
            gate_config = load_config(config.postprocess.gate_config)
            gate = (plans(gate_config), gate_config)
        return cls(plans(config), config, gate)

    def need(self, path: Path) -> Need | None:
        """The case's need; None where its header does not describe a 3D grid (reading it says why).
        Raises CaseError for a file that is no readable NIfTI, as reading it would."""
        path = Path(path)
        if path not in self._needs:
            header = read_header(path)
            self._needs[path] = None if header is None else estimate(header, self.plans, self.config, self.gate)
        return self._needs[path]

    def refusal(self, extra_bytes: int) -> str | None:
        """Why `extra_bytes` more cannot be taken now, or None when they fit."""
        in_use = resident_bytes()
        if in_use + extra_bytes <= self.limit:
            return None
        return describe(extra_bytes, in_use, self.limit, self.source)
