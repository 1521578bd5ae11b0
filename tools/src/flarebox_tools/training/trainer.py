"""The training loop: one process, or one per GPU / CPU slot under `torchrun` with torch DDP.

    flarebox-tools train --dataset RAW --out MODEL_DIR --config train.toml
    torchrun --standalone --nproc_per_node 2 -m flarebox_tools.training --dataset RAW --out MODEL_DIR ...

In: an nnU-Net raw dataset and a model folder (plans.json + dataset.json, or a NetworkSpec to write
them). Out: MODEL_DIR/fold_<k>/checkpoint_final.pth (and _best, _latest) with nnU-Net's keys.

nnUNetTrainer's recipe: He initialisation; SGD (momentum 0.99, Nesterov, weight decay 3e-5) or
AdamW; poly learning rate lr0 * (1 - epoch / epochs) ** 0.9 set at each epoch's start; gradient
norm clipped to 12; fp16 autocast with grad scaling on CUDA (bf16 autocast on CPUs with native
bf16). With a time limit the schedule runs on max(epoch / epochs, training time / limit), so it
still decays to 0 when time, not epochs, ends it.

Around the step: batches are made in a worker process (loader.py) as a function of the step alone;
tensors are channels-last-3d (oneDNN's faster layout for 3D convolutions on the CPU); validation
time is not training time.

Interruptions: checkpoint_latest.pth is written every `checkpoint_every_minutes` and, on SIGTERM or
SIGINT, after the step in progress. It holds the step reached, the optimiser and grad-scaler state,
the learning rate of the epoch in progress, the training time and the logs; running the same
command again goes on from there and draws the very batches the uninterrupted run would have, so
the run ends with the same weights.

Under torchrun (torch.distributed, gloo on the CPU, NCCL on GPUs) the model is wrapped in
DistributedDataParallel, which averages gradients; each rank preprocesses its share of the cases,
draws its share of the global batch with its own seed (as DistributedSampler seeds by rank), and rank
0 alone validates and writes checkpoints. Ranks agree on the learning rate, on stopping and on
saving by collective operations, and the final checkpoint records every rank's parameter digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flarebox.cpu import NATIVE_BF16, cpu_flags
from flarebox.errors import CaseError, ConfigError
from flarebox.models import ModelPlan, build_network, load_plan
from flarebox_tools.training import checkpoint
from flarebox_tools.training.augment import SpatialSettings, spatial_margin
from flarebox_tools.training.config import NetworkSpec, TrainConfig
from flarebox_tools.training.data import TrainingCase, list_cases, load_cached, prepare_cache, split_cases
from flarebox_tools.training.loader import BatchRecipe, batches
from flarebox_tools.training.loss import deep_supervision_loss
from flarebox_tools.training.plans import dataset_labels, write_plans
from flarebox_tools.training.sampling import rank_batch_size
from flarebox_tools.training.validate import ValidationScores, validate

log = logging.getLogger("flarebox_tools.training")


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def start_processes(device_setting: str) -> Processes:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    if world == 1:
        return Processes(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # preprocessing a large dataset keeps ranks apart for a while: wait longer than the 30 min default
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def he_init(module: torch.nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2): Kaiming normal for the LeakyReLU slope, zero biases."""
    if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d | torch.nn.Conv2d | torch.nn.ConvTranspose2d):
        torch.nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def poly_lr(initial_lr: float, progress: float, exponent: float = 0.9) -> float:
    """nnU-Net's PolyLRScheduler: initial_lr * (1 - progress) ** exponent, progress = epoch / epochs."""
    return initial_lr * max(0.0, 1.0 - progress) ** exponent


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    """foreach=True: one batched kernel per operation over all the parameters. torch picks it only for
    CUDA tensors; on the CPU the per-tensor loop makes an AdamW step of a demo network 5-8x slower
    (docs/training.md)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.learning_rate, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay, foreach=True)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True)


def labelled_mask(case_ids: tuple[str, ...], config: TrainConfig, num_classes: int) -> torch.Tensor | None:
    """(b, k) bool: the classes each sample's source dataset annotates; None when all annotate all."""
    per_case = [config.labelled_classes(c) for c in case_ids]
    if all(classes is None for classes in per_case):
        return None
    mask = torch.zeros(len(case_ids), num_classes, dtype=torch.bool)
    mask[:, 0] = True
    for i, classes in enumerate(per_case):
        if classes is None:
            mask[i] = True
        else:
            mask[i, list(classes)] = True
    return mask


def check_partial_labels(cases: list[TrainingCase], config: TrainConfig, num_classes: int) -> None:
    """A case may only contain the classes its dataset is declared to annotate."""
    for case in cases:
        present = set(case.class_locations)
        if max(present, default=0) >= num_classes:
            raise CaseError(case.case_id, f"label {max(present)} but the model has {num_classes} classes")
        declared = config.labelled_classes(case.case_id)
        if declared is not None and not present <= set(declared):
            raise ConfigError(f"[train] partial_labels: case {case.case_id} contains labels "
                              f"{sorted(present - set(declared))} its dataset is declared not to annotate")


def parameter_digest(network: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, to check that DDP replicas are identical."""
    digest = hashlib.sha256()
    for tensor in checkpoint.unwrap(network).state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _prepare_model_folder(dataset_dir: Path, model_dir: Path, spec: NetworkSpec | None, procs: Processes,
                          resume: bool) -> ModelPlan:
    if procs.rank == 0:
        if spec is not None and not resume:
            labels, channel = dataset_labels(dataset_dir)
            write_plans(model_dir, spec, labels, channel_name=channel, num_training=len(list_cases(dataset_dir)))
        elif not (model_dir / "plans.json").is_file():
            raise ConfigError(f"{model_dir}: no plans.json; give a [network] table to create the model")
    if procs.distributed:
        dist.barrier()
    return load_plan(model_dir)


def _load_data(dataset_dir: Path, plan: ModelPlan, cache_dir: Path, config: TrainConfig, fold: int,
               procs: Processes) -> tuple[list[TrainingCase], list[TrainingCase]]:
    raw = list_cases(dataset_dir)
    start = time.perf_counter()
    folder = prepare_cache(raw[procs.rank::procs.world], plan, cache_dir)  # each rank its share
    if procs.distributed:
        dist.barrier()
    train_ids, val_ids = split_cases([c.case_id for c in raw], config.validation_cases, fold)
    if procs.rank == 0:
        log.info("%d cases preprocessed in %.0fs (cache %s); %d for training, %d held out",
                 len(raw), time.perf_counter() - start, folder, len(train_ids), len(val_ids))
    return load_cached(train_ids, folder), load_cached(val_ids, folder)


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a step; checkpoint_latest.pth holds that step."""

    def __init__(self, checkpoint_path: Path, steps_done: int, signum: int) -> None:
        super().__init__(f"stopped by signal {signum} after step {steps_done}; {checkpoint_path} holds it: "
                         "run the same command again to go on")
        self.checkpoint_path, self.steps_done, self.signum = checkpoint_path, steps_done, signum


def exit_status(work: Callable[[], object]) -> int:
    """A command's exit status around `work`: 0 when it completes, 128 + the signal when SIGTERM or
    SIGINT interrupted it (said in one line: its checkpoint lets the same command go on)."""
    try:
        work()
    except Interrupted as stopped:
        log.warning("%s", stopped)
        return 128 + stopped.signum
    return 0


class StopSignals:
    """While active, SIGTERM and SIGINT only raise a flag the loop checks after each step (a second
    SIGINT still interrupts at once). Signals can only be caught in the main thread."""

    def __init__(self) -> None:
        self.requested = 0  # the signal received, 0 for none
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        log.warning("signal %d: stopping after this step (checkpoint_latest.pth)", signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPUs where oneDNN's bf16 kernels beat f32."""
    return bool(cpu_flags() & NATIVE_BF16)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for f32."""
    if not config.amp:
        return None
    if config.amp_dtype != "auto":
        return getattr(torch, config.amp_dtype)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


# relative, per parameter tensor. At initialisation bf16 rounding alone moves the small gradients of
# the deep stages' norms by up to ~60 % in our demo networks (0.3 % for one convolution); the broken
# kernel below gives 100 %, 1e37 or NaN.
BF16_GRADIENT_TOLERANCE = 0.75


def bf16_gradients_agree(network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor | None,
                         config: TrainConfig, tolerance: float = BF16_GRADIENT_TOLERANCE) -> bool:
    """Whether bf16 autocast gives this network's gradients on this batch within `tolerance` of f32,
    tensor by tensor (relative), all finite. CPU bf16 kernels are not to be trusted blindly: torch 2.13.0's
    oneDNN Conv3d weight gradient under bf16 autocast is wrong (off by 100 %, or 1e37, or NaN) for
    feature maps a few voxels deep, the deepest stages of our networks, on an AVX-512 BF16 CPU
    (docs/training.md); one step of it turned every weight into NaN. Costs two forward-backward
    passes, once per training; leaves no gradient behind."""
    grads = []
    for dtype in (None, torch.bfloat16):
        network.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            outputs = network(x)
        deep_supervision_loss(outputs, y, labelled, batch_dice=config.batch_dice).backward()
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in network.parameters()])
    network.zero_grad(set_to_none=True)
    pairs = [(r, g) for r, g in zip(*grads, strict=True) if r is not None and g is not None]
    # A convolution's bias before instance normalisation has a gradient of ~0 (the norm removes the
    # mean): its relative error means nothing, so no tensor is held to less than 10 % of the median norm.
    floor = 0.1 * float(torch.stack([r.norm() for r, _ in pairs]).median())
    for reference, got in pairs:
        if not bool(torch.isfinite(got).all()):
            return False
        if float((got - reference).norm()) > tolerance * max(float(reference.norm()), floor):
            return False
    return True


def inner_slices(outputs: torch.Tensor | list[torch.Tensor], y: torch.Tensor, z_halo: int
                 ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """A 2.5D network's outputs and targets without the patch's halo slices, whose neighbours the
    network only had repeated (inference never keeps those: sliding_window.py)."""
    if z_halo <= 0:
        return outputs, y
    inner = slice(z_halo, -z_halo)
    if isinstance(outputs, torch.Tensor):
        return outputs[:, :, inner], y[:, inner]
    return [o[:, :, inner] for o in outputs], y[:, inner]


def train_step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
               x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor | None, config: TrainConfig,
               amp: torch.dtype | None, z_halo: int = 0) -> float:
    """One optimiser step on one batch; returns the loss. Under DDP, backward() averages gradients."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        outputs = network(x)
    outputs, y = inner_slices(outputs, y, z_halo)
    if labelled is not None:
        labelled = labelled.to(x.device)
    loss = deep_supervision_loss(outputs, y, labelled, batch_dice=config.batch_dice)
    return _backward_and_step(loss, (network,), (optimizer,), scaler, config)


def _backward_and_step(loss: torch.Tensor, networks: tuple[torch.nn.Module, ...],
                       optimizers: tuple[torch.optim.Optimizer, ...], scaler: torch.amp.GradScaler | None,
                       config: TrainConfig) -> float:
    """Backward, each network's gradient norm clipped, each optimiser stepped; returns the loss."""
    if scaler is not None:
        scaler.scale(loss).backward()
        for network, optimizer in zip(networks, optimizers, strict=True):
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip_norm, foreach=True)
            scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        for network, optimizer in zip(networks, optimizers, strict=True):
            torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip_norm, foreach=True)
            optimizer.step()
    return float(loss.detach())


def cps_ramp(epochs_done: float, config: TrainConfig) -> float:
    """Cross pseudo supervision's weight after `epochs_done` (fractional) epochs: rising linearly
    from 0 to config.cps_weight over config.cps_ramp_epochs, then flat."""
    if config.cps_ramp_epochs <= 0:
        return config.cps_weight
    return config.cps_weight * min(1.0, epochs_done / config.cps_ramp_epochs)


def _finest(outputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


def cps_loss(outputs_a: torch.Tensor | list[torch.Tensor], outputs_b: torch.Tensor | list[torch.Tensor],
             *, batch_dice: bool = False) -> torch.Tensor:
    """Cross pseudo supervision: each network's outputs against the other's argmax (of its finest
    output, no gradient through it), Dice + CE on every class of every sample."""
    with torch.no_grad():
        pseudo_a, pseudo_b = _finest(outputs_a).argmax(1), _finest(outputs_b).argmax(1)
    return (deep_supervision_loss(outputs_a, pseudo_b, batch_dice=batch_dice)
            + deep_supervision_loss(outputs_b, pseudo_a, batch_dice=batch_dice))


def cps_step(networks: tuple[torch.nn.Module, torch.nn.Module],
             optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], scaler: torch.amp.GradScaler | None,
             x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor | None, config: TrainConfig,
             amp: torch.dtype | None, z_halo: int, weight: float) -> float:
    """One step of both networks on one batch: each one's loss on the labels plus `weight` times the
    cross pseudo supervision loss; returns the total."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        outputs = [network(x) for network in networks]
    pairs = [inner_slices(o, y, z_halo) for o in outputs]
    if labelled is not None:
        labelled = labelled.to(x.device)
    loss = sum(deep_supervision_loss(o, target, labelled, batch_dice=config.batch_dice) for o, target in pairs)
    if weight > 0:
        loss = loss + weight * cps_loss(pairs[0][0], pairs[1][0], batch_dice=config.batch_dice)
    return _backward_and_step(loss, networks, optimizers, scaler, config)


def split_unlabelled(cases: list[TrainingCase], config: TrainConfig) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """(labelled, unlabelled): a case whose dataset is declared to annotate no class is unlabelled."""
    unlabelled = [c for c in cases if config.labelled_classes(c.case_id) == ()]
    return [c for c in cases if config.labelled_classes(c.case_id) != ()], unlabelled


def schedule_progress(epoch: int, config: TrainConfig, training_seconds: float) -> float:
    """Schedule position in [0, 1]: epochs done, or training time used (over all resumed pieces) when
    that is further along."""
    progress = epoch / config.epochs
    if config.time_limit_minutes > 0:
        progress = max(progress, training_seconds / (60 * config.time_limit_minutes))
    return min(progress, 1.0)


def _agree(values: list[float], procs: Processes, op: str) -> list[float]:
    """Rank 0's values (op="broadcast"), or their maximum or mean over the ranks ("max", "mean"), so
    that all ranks decide alike."""
    if not procs.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if op == "broadcast":
        dist.broadcast(tensor, 0)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= procs.world
    return tensor.tolist()


def _log_epoch(epoch: int, config: TrainConfig, progress: float, loss: float, lr: float, seconds: float,
               steps_per_s: float, scores: ValidationScores | None) -> None:
    line = f"epoch {epoch + 1:4d}/{config.epochs}"
    if config.time_limit_minutes > 0:
        line += f" ({100 * progress:3.0f}% of {config.time_limit_minutes:g} min)"
    line += f"  loss {loss:+.4f}  lr {lr:.5f}  {steps_per_s:.2f} steps/s"
    if scores is not None:
        line += f"  val DSC {scores.mean_dsc:.3f} NSD {scores.mean_nsd:.3f}"
    log.info("%s  %.1fs", line, seconds)


# what a resumed run must share with the run it resumes, or it would train on other batches
RESUME_KEYS = ("seed", "batch_size", "iterations_per_epoch", "patch_zyx", "foreground_oversampling", "cps_weight",
               "unlabelled_share")


def train(
    dataset_dir: str | Path,
    model_dir: str | Path,
    config: TrainConfig,
    *,
    network_spec: NetworkSpec | None = None,
    fold: int = 0,
    cache_dir: str | Path | None = None,
    resume: bool | None = None,
) -> Path:
    """Train one fold; returns the final checkpoint's path (on every rank).

    network_spec: write a new plans.json/dataset.json into model_dir first (else use the folder's).
    cache_dir: where preprocessed cases are cached (default DATASET/preprocessed).
    resume: None (default) goes on from fold_<k>/checkpoint_latest.pth when there is one (network,
    optimizer, grad scaler, step, schedule, training time, logs; batches are a function of the step)
    and starts afresh otherwise; True insists on resuming, False starts afresh.
    Raises Interrupted when SIGTERM or SIGINT stopped it (after saving checkpoint_latest.pth).
    """
    dataset_dir, model_dir = Path(dataset_dir), Path(model_dir)
    latest = model_dir / f"fold_{fold}" / "checkpoint_latest.pth"
    if resume is None:
        resume = latest.is_file()
    elif resume and not latest.is_file():
        raise ConfigError(f"{latest}: no checkpoint to continue from")
    procs = start_processes(config.device)
    try:
        return _train(dataset_dir, model_dir, config, network_spec, fold,
                      Path(cache_dir) if cache_dir else dataset_dir / "preprocessed", resume, procs)
    finally:
        if procs.distributed:
            dist.destroy_process_group()


def _check_resumable(state: dict, config: TrainConfig, model_dir: Path, spec: NetworkSpec | None,
                     num_training: int) -> None:
    before = state["logging"].get("train_config", {})
    changed = [k for k in RESUME_KEYS if k in before and before[k] != _plain(getattr(config, k))]
    if changed:
        raise ConfigError(f"{model_dir}: its checkpoint was trained with other {', '.join(changed)} "
                          f"({', '.join(f'{k}={before[k]}' for k in changed)}); start afresh in another folder")
    if spec is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write_plans(tmp, spec, state["init_args"]["dataset_json"]["labels"], num_training=num_training)
            wanted = json.loads((Path(tmp) / "plans.json").read_text())["configurations"]
        if wanted != state["init_args"]["plans"]["configurations"]:
            raise ConfigError(f"{model_dir}: its checkpoint holds another network than [network] describes; "
                              "start afresh in another folder")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _train(dataset_dir: Path, model_dir: Path, config: TrainConfig, spec: NetworkSpec | None, fold: int,
           cache_dir: Path, resume: bool, procs: Processes) -> Path:
    fold_dir = model_dir / f"fold_{fold}"
    state = checkpoint.load(fold_dir / "checkpoint_latest.pth") if resume else None
    if state is not None:
        _check_resumable(state, config, model_dir, spec, len(list_cases(dataset_dir)))
    plan = _prepare_model_folder(dataset_dir, model_dir, spec, procs, resume)
    train_cases, val_cases = _load_data(dataset_dir, plan, cache_dir, config, fold, procs)
    check_partial_labels(train_cases + val_cases, config, plan.num_classes)
    # unlabelled cases: never validated on; learnt from through cross pseudo supervision only
    val_cases, held_unlabelled = split_unlabelled(val_cases, config)
    train_cases, unlabelled = split_unlabelled(train_cases, config)
    unlabelled += held_unlabelled
    if not train_cases:
        raise ConfigError(f"{dataset_dir}: no labelled case to train on")
    if unlabelled and procs.rank == 0:
        log.info("%d unlabelled cases: %s", len(unlabelled),
                 f"{config.unlabelled_share:.0%} of the samples (cross pseudo supervision)" if config.cps_weight > 0
                 else "unused (cps_weight = 0)")
    if config.cps_weight == 0:
        unlabelled = []
    patch = config.patch_zyx or plan.patch_zyx
    settings = SpatialSettings(config.rotation_deg, config.scale_range, config.elastic_deformation,
                               config.mirror_axes if config.spatial_augmentation else ())
    recipe = BatchRecipe(
        cases=train_cases, batch_size=rank_batch_size(config.batch_size, procs.rank, procs.world), patch_zyx=patch,
        margin_zyx=spatial_margin(patch, settings) if config.spatial_augmentation else (0, 0, 0),
        oversampling=config.foreground_oversampling, settings=settings,
        spatial_augmentation=config.spatial_augmentation, intensity_augmentation=config.intensity_augmentation,
        seed=config.seed, rank=procs.rank, unlabelled=unlabelled, unlabelled_share=config.unlabelled_share)

    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's too)
    network = build_network(plan, deep_supervision=config.deep_supervision)
    network.apply(he_init)
    if config.init_weights and state is None:
        try:
            network.load_state_dict(checkpoint.load(config.init_weights)["network_weights"])
        except (OSError, KeyError, RuntimeError) as error:
            raise ConfigError(f"[train] init_weights: {config.init_weights}: {str(error).splitlines()[0]}") from error
        if procs.rank == 0:
            log.info("starting from the weights of %s", config.init_weights)
    # channels-last-3d suits 3D convolutions; a 2.5D network's are 2D, on a batch it makes itself
    layout = torch.channels_last_3d if config.channels_last and not plan.z_halo else torch.contiguous_format
    network.to(procs.device, memory_format=layout).train()
    optimizer = make_optimizer(network.parameters(), config)
    partner: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None
    if config.cps_weight > 0:  # the second network: same plan, its own initialisation
        torch.manual_seed(config.seed + 1)
        other = build_network(plan, deep_supervision=config.deep_supervision)
        other.apply(he_init)
        other.to(procs.device, memory_format=layout).train()
        partner = (other, make_optimizer(other.parameters(), config))
    amp = autocast_dtype(config, procs.device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and procs.device.type == "cuda" else None
    history: dict[str, Any] = {"train_losses": [], "lrs": [], "epoch_start_timestamps": [],
                               "epoch_end_timestamps": [], "mean_fg_dice": [], "ema_fg_dice": [],
                               "dice_per_class_or_region": [], "validation": []}
    steps_done, training_seconds, best_ema, epoch_losses, epoch_lr = 0, 0.0, None, [], None
    if state is not None:
        network.load_state_dict(state["network_weights"])
        if state.get("optimizer_state") is not None:
            optimizer.load_state_dict(state["optimizer_state"])
        if scaler is not None and state.get("grad_scaler_state") is not None:
            scaler.load_state_dict(state["grad_scaler_state"])
        if partner is not None:
            partner[0].load_state_dict(state["cps_partner"]["network_weights"])
            partner[1].load_state_dict(state["cps_partner"]["optimizer_state"])
        history, best_ema = state["logging"], state["_best_ema"]
        progress_state = history.get("progress", {})
        steps_done = int(progress_state.get("steps_done", state["current_epoch"] * config.iterations_per_epoch))
        training_seconds = float(progress_state.get("training_seconds", 0.0))
        epoch_losses = list(progress_state.get("epoch_losses", []))
        epoch_lr = progress_state.get("epoch_lr")
    history["train_config"] = {k: _plain(v) for k, v in vars(config).items()}
    if procs.distributed:
        # without deep supervision the decoder's other heads get no gradient, which DDP must be told
        def wrap(module: torch.nn.Module) -> torch.nn.Module:
            return torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
                find_unused_parameters=not config.deep_supervision)

        network = wrap(network)
        if partner is not None:
            partner = (wrap(partner[0]), partner[1])
    mirror_axes = settings.mirror_axes
    per_epoch = config.iterations_per_epoch
    total_steps = config.epochs * per_epoch

    def save(name: str) -> Path:
        history["progress"] = {"steps_done": steps_done, "training_seconds": training_seconds,
                               "epoch_losses": list(epoch_losses), "epoch_lr": epoch_lr}
        return checkpoint.save(fold_dir / name, network, model_dir=model_dir, fold=fold,
                               epochs_done=steps_done // per_epoch, logging=history, best_ema=best_ema,
                               mirror_axes=mirror_axes, optimizer=optimizer, grad_scaler=scaler, partner=partner)

    final = fold_dir / "checkpoint_final.pth"
    finished = steps_done >= total_steps or schedule_progress(0, config, training_seconds) >= 1.0
    if state is not None and procs.rank == 0:
        log.info("resuming at step %d of %d (epoch %d, %.1f min trained)", steps_done, total_steps,
                 steps_done // per_epoch + 1, training_seconds / 60)
    if finished and state is not None and final.is_file():
        log.info("%s: already trained to the end", final)
        return final

    stream = batches(recipe, steps_done, total_steps, workers=config.data_workers,
                     pin_memory=procs.device.type == "cuda")
    interrupted = False
    check_bf16 = amp == torch.bfloat16 and procs.device.type == "cpu"
    last_save = clock = time.perf_counter()
    epoch_clock, steps_at_epoch_start = clock, steps_done
    with StopSignals() as signals:
        while not finished:
            epoch, within = divmod(steps_done, per_epoch)
            if within == 0 or epoch_lr is None:
                progress = _agree([schedule_progress(epoch, config, training_seconds)], procs, "broadcast")[0]
                epoch_lr = poly_lr(config.learning_rate, progress, config.poly_exponent)
                if within == 0:
                    history["epoch_start_timestamps"].append(time.time())
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr
            batch = next(stream)
            x = batch.images.to(procs.device, non_blocking=True, memory_format=layout)
            y = batch.labels.to(procs.device, non_blocking=True)
            labelled = labelled_mask(batch.case_ids, config, plan.num_classes)
            if check_bf16:  # on the first batch, on every rank; all ranks then train alike
                check_bf16 = False
                inner = network.module if procs.distributed else network
                agree = bf16_gradients_agree(inner, x, y, labelled, config)
                if _agree([float(agree)], procs, "mean")[0] < 1.0:
                    amp = None
                    if procs.rank == 0:
                        log.warning("bf16 autocast gives gradients unlike f32's for this network on this CPU "
                                    "(torch %s): training in f32", torch.__version__)
            if partner is None:
                loss = train_step(network, optimizer, scaler, x, y, labelled, config, amp, plan.z_halo)
            else:
                loss = cps_step((network, partner[0]), (optimizer, partner[1]), scaler, x, y, labelled, config, amp,
                                plan.z_halo, cps_ramp(steps_done / per_epoch, config))
            epoch_losses.append(loss)
            steps_done += 1
            now = time.perf_counter()
            training_seconds += now - clock
            clock = now

            if steps_done % per_epoch == 0:
                mean_loss = _agree([float(np.mean(epoch_losses))], procs, "mean")[0]
                history["train_losses"].append(mean_loss)
                history["lrs"].append(epoch_lr)
                history["epoch_end_timestamps"].append(time.time())
                progress = _agree([schedule_progress(epoch + 1, config, training_seconds)], procs, "broadcast")[0]
                finished = steps_done >= total_steps or progress >= 1.0
                scores = None
                if procs.rank == 0 and val_cases and ((epoch + 1) % config.validate_every_epochs == 0 or finished):
                    scores = validate(network, val_cases, plan, procs.device, step_size=config.validation_step)
                    best_ema = scores.mean_dsc if best_ema is None else 0.9 * best_ema + 0.1 * scores.mean_dsc
                    history["mean_fg_dice"].append(scores.mean_dsc)
                    history["ema_fg_dice"].append(best_ema)
                    history["dice_per_class_or_region"].append([s["dsc"] for s in scores.per_class.values()])
                    history["validation"].append({"epoch": epoch + 1, "mean_dsc": scores.mean_dsc,
                                                  "mean_nsd": scores.mean_nsd, "per_class": scores.per_class})
                    if best_ema >= max(history["ema_fg_dice"]):
                        save("checkpoint_best.pth")
                if procs.rank == 0:
                    seconds = time.perf_counter() - epoch_clock
                    _log_epoch(epoch, config, progress, mean_loss, epoch_lr, seconds,
                               (steps_done - steps_at_epoch_start) / seconds, scores)
                epoch_losses, epoch_lr = [], None
                if procs.distributed:
                    dist.barrier()  # the others wait while rank 0 validates and saves
                clock = epoch_clock = time.perf_counter()  # validation is not training time
                steps_at_epoch_start = steps_done
            stop, due = _agree([float(signals.requested or 0),
                                float(time.perf_counter() - last_save >= 60 * config.checkpoint_every_minutes)],
                               procs, "max")
            if stop and not finished:
                interrupted = True
                break
            if due and not finished:
                if procs.rank == 0:
                    save("checkpoint_latest.pth")
                last_save = time.perf_counter()

    if interrupted:
        path = fold_dir / "checkpoint_latest.pth"
        if procs.rank == 0:
            save("checkpoint_latest.pth")
        if procs.distributed:
            dist.barrier()
        raise Interrupted(path, steps_done, int(stop))

    digests = [parameter_digest(network)]
    if procs.distributed:
        digests = [None] * procs.world
        dist.all_gather_object(digests, parameter_digest(network))
    if procs.rank == 0:
        history["parameter_digests_per_rank"] = digests
        if procs.distributed and len(set(digests)) != 1:
            log.error("torchrun ranks ended with different parameters: %s", digests)
        save("checkpoint_latest.pth")
        save("checkpoint_final.pth")
        log.info("%d steps (%d epochs) in %.1f min of training; wrote %s", steps_done, steps_done // per_epoch,
                 training_seconds / 60, final)
    if procs.distributed:
        dist.barrier()
    return final
