"""The training loop: one process, or one per GPU / CPU slot under `torchrun` with torch DDP.

    python -m flarebox.training train --dataset RAW --out MODEL_DIR --config train.toml
    torchrun --standalone --nproc_per_node 2 -m flarebox.training train --dataset RAW --out MODEL_DIR ...

In: an nnU-Net raw dataset and a model folder (plans.json + dataset.json, or a NetworkSpec to write
them). Out: MODEL_DIR/fold_<k>/checkpoint_final.pth (and _best, _latest) with nnU-Net's keys.

nnUNetTrainer's recipe: He initialisation; SGD (momentum 0.99, Nesterov, weight decay 3e-5) or
AdamW; poly learning rate lr0 * (1 - epoch / epochs) ** 0.9 set at each epoch's start; gradient
norm clipped to 12; fp16 autocast with grad scaling on CUDA. With a time limit the schedule runs
on max(epoch / epochs, elapsed / limit), so it still decays to 0 when time, not epochs, ends it.

Under torchrun (torch.distributed, gloo on the CPU, NCCL on GPUs) the model is wrapped in
DistributedDataParallel, which averages gradients; each rank preprocesses its share of the cases,
draws its share of the global batch with its own seed (as DistributedSampler seeds by rank), and rank
0 alone validates and writes checkpoints. Ranks agree on the learning rate and on when to stop by an
all-reduce, and the final checkpoint records every rank's parameter digest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flarebox.errors import CaseError, ConfigError
from flarebox.models import ModelPlan, build_network, load_plan
from flarebox.training import checkpoint
from flarebox.training.augment import SpatialSettings, centre_crop, intensity, is_flat, spatial, spatial_margin
from flarebox.training.config import NetworkSpec, TrainConfig
from flarebox.training.data import TrainingCase, list_cases, load_cached, prepare_cache, split_cases
from flarebox.training.loss import deep_supervision_loss
from flarebox.training.plans import dataset_labels, write_plans
from flarebox.training.sampling import Batch, rank_batch_size, sample_batch
from flarebox.training.validate import ValidationScores, validate

log = logging.getLogger("flarebox.training")


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
    if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
        torch.nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def poly_lr(initial_lr: float, progress: float, exponent: float = 0.9) -> float:
    """nnU-Net's PolyLRScheduler: initial_lr * (1 - progress) ** exponent, progress = epoch / epochs."""
    return initial_lr * max(0.0, 1.0 - progress) ** exponent


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.learning_rate, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


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


def augmented_batch(batch: Batch, patch_zyx: tuple[int, int, int], config: TrainConfig, settings: SpatialSettings,
                    device: torch.device, rng: np.random.Generator,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled crops -> augmented (b, c, *patch) images and (b, *patch) int64 labels on `device`."""
    x = torch.from_numpy(batch.images).to(device, non_blocking=True)
    y = torch.from_numpy(batch.labels).to(device, non_blocking=True).long()
    if config.spatial_augmentation:
        x, y = spatial(x, y, patch_zyx, settings, rng, gen)
    else:
        x, y = centre_crop(x, patch_zyx), centre_crop(y, patch_zyx)
    if config.intensity_augmentation:
        x = intensity(x, is_flat(patch_zyx), rng, gen)
    return x, y


def train_step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
               x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor | None, config: TrainConfig,
               use_amp: bool) -> float:
    """One optimiser step on one batch; returns the loss. Under DDP, backward() averages gradients."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, enabled=use_amp):
        outputs = network(x)
    if labelled is not None:
        labelled = labelled.to(x.device)
    loss = deep_supervision_loss(outputs, y, labelled, batch_dice=config.batch_dice)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip_norm)
        optimizer.step()
    return float(loss.detach())


def _progress(epoch: int, config: TrainConfig, elapsed_s: float, procs: Processes) -> float:
    """Schedule position in [0, 1]: epochs done, or time used when that is further along. Rank 0's
    clock decides, so every rank uses the same learning rate."""
    progress = epoch / config.epochs
    if config.time_limit_minutes > 0:
        progress = max(progress, elapsed_s / (60 * config.time_limit_minutes))
    if procs.distributed:
        value = torch.tensor([progress], dtype=torch.float64)
        dist.broadcast(value, 0)
        progress = float(value.item())
    return progress


def _log_epoch(epoch: int, config: TrainConfig, progress: float, loss: float, lr: float, seconds: float,
               scores: ValidationScores | None) -> None:
    line = f"epoch {epoch + 1:4d}/{config.epochs}"
    if config.time_limit_minutes > 0:
        line += f" ({100 * progress:3.0f}% of {config.time_limit_minutes:g} min)"
    line += f"  loss {loss:+.4f}  lr {lr:.5f}"
    if scores is not None:
        line += f"  val DSC {scores.mean_dsc:.3f} NSD {scores.mean_nsd:.3f}"
    log.info("%s  %.1fs", line, seconds)


def train(
    dataset_dir: str | Path,
    model_dir: str | Path,
    config: TrainConfig,
    *,
    network_spec: NetworkSpec | None = None,
    fold: int = 0,
    cache_dir: str | Path | None = None,
    resume: bool = False,
) -> Path:
    """Train one fold; returns the final checkpoint's path (on every rank).

    network_spec: write a new plans.json/dataset.json into model_dir first (else use the folder's).
    cache_dir: where preprocessed cases are cached (default DATASET/preprocessed).
    resume: continue from fold_<k>/checkpoint_latest.pth (network, optimizer, schedule, logs).
    """
    dataset_dir, model_dir = Path(dataset_dir), Path(model_dir)
    procs = start_processes(config.device)
    try:
        return _train(dataset_dir, model_dir, config, network_spec, fold,
                      Path(cache_dir) if cache_dir else dataset_dir / "preprocessed", resume, procs)
    finally:
        if procs.distributed:
            dist.destroy_process_group()


def _train(dataset_dir: Path, model_dir: Path, config: TrainConfig, spec: NetworkSpec | None, fold: int,
           cache_dir: Path, resume: bool, procs: Processes) -> Path:
    plan = _prepare_model_folder(dataset_dir, model_dir, spec, procs, resume)
    train_cases, val_cases = _load_data(dataset_dir, plan, cache_dir, config, fold, procs)
    check_partial_labels(train_cases + val_cases, config, plan.num_classes)
    patch = config.patch_zyx or plan.patch_zyx
    settings = SpatialSettings(config.rotation_deg, config.scale_range, config.elastic_deformation,
                               config.mirror_axes if config.spatial_augmentation else ())
    margin = spatial_margin(patch, settings) if config.spatial_augmentation else (0, 0, 0)
    local_batch = rank_batch_size(config.batch_size, procs.rank, procs.world)
    fold_dir = model_dir / f"fold_{fold}"

    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's too)
    network = build_network(plan, deep_supervision=config.deep_supervision)
    network.apply(he_init)
    network.to(procs.device).train()
    optimizer = make_optimizer(network.parameters(), config)
    use_amp = config.amp and procs.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    history: dict[str, list] = {"train_losses": [], "lrs": [], "epoch_start_timestamps": [],
                                "epoch_end_timestamps": [], "mean_fg_dice": [], "ema_fg_dice": [],
                                "dice_per_class_or_region": [], "validation": []}
    first_epoch, best_ema = 0, None
    if resume:
        state = checkpoint.load(fold_dir / "checkpoint_latest.pth")
        network.load_state_dict(state["network_weights"])
        if state.get("optimizer_state") is not None:
            optimizer.load_state_dict(state["optimizer_state"])
        if scaler is not None and state.get("grad_scaler_state") is not None:
            scaler.load_state_dict(state["grad_scaler_state"])
        history, first_epoch, best_ema = state["logging"], int(state["current_epoch"]), state["_best_ema"]
    if procs.distributed:
        # without deep supervision the decoder's other heads get no gradient, which DDP must be told
        network = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
            find_unused_parameters=not config.deep_supervision)

    # DistributedSampler-style: one seed for the run, a different stream per rank (and per resume)
    rng = np.random.default_rng([config.seed, procs.rank, first_epoch])
    gen = torch.Generator(device=procs.device).manual_seed(config.seed * 1_000_003 + procs.rank * 7919 + first_epoch)
    mirror_axes = settings.mirror_axes

    def save(name: str) -> Path:
        return checkpoint.save(fold_dir / name, network, model_dir=model_dir, fold=fold, epochs_done=epoch + 1,
                               logging=history, best_ema=best_ema, mirror_axes=mirror_axes, optimizer=optimizer,
                               grad_scaler=scaler)

    start = time.perf_counter()
    epoch = first_epoch - 1
    for epoch in range(first_epoch, config.epochs):
        progress = _progress(epoch, config, time.perf_counter() - start, procs)
        lr = poly_lr(config.learning_rate, progress, config.poly_exponent)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_start = time.perf_counter()
        history["epoch_start_timestamps"].append(time.time())
        losses = []
        for _ in range(config.iterations_per_epoch):
            batch = sample_batch(train_cases, local_batch, patch, rng, oversampling=config.foreground_oversampling,
                                 margin_zyx=margin)
            x, y = augmented_batch(batch, patch, config, settings, procs.device, rng, gen)
            labelled = labelled_mask(batch.case_ids, config, plan.num_classes)
            losses.append(train_step(network, optimizer, scaler, x, y, labelled, config, use_amp))
        mean_loss = float(np.mean(losses))
        if procs.distributed:
            value = torch.tensor([mean_loss], dtype=torch.float64)
            dist.all_reduce(value)
            mean_loss = float(value.item()) / procs.world
        history["train_losses"].append(mean_loss)
        history["lrs"].append(lr)
        history["epoch_end_timestamps"].append(time.time())

        progress = _progress(epoch + 1, config, time.perf_counter() - start, procs)
        last = epoch + 1 >= config.epochs or progress >= 1.0
        scores = None
        if procs.rank == 0 and val_cases and ((epoch + 1) % config.validate_every_epochs == 0 or last):
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
            _log_epoch(epoch, config, progress, mean_loss, lr, time.perf_counter() - epoch_start, scores)
            if (epoch + 1) % config.save_every_epochs == 0 and not last:
                save("checkpoint_latest.pth")
        if procs.distributed:
            dist.barrier()  # the others wait while rank 0 validates and saves
        if last:
            break

    digests = [parameter_digest(network)]
    if procs.distributed:
        digests = [None] * procs.world
        dist.all_gather_object(digests, parameter_digest(network))
    path = fold_dir / "checkpoint_final.pth"
    if procs.rank == 0:
        history["parameter_digests_per_rank"] = digests
        if procs.distributed and len(set(digests)) != 1:
            log.error("torchrun ranks ended with different parameters: %s", digests)
        save("checkpoint_latest.pth")
        save("checkpoint_final.pth")
        log.info("%d epochs in %.1f min; wrote %s", epoch + 1 - first_epoch, (time.perf_counter() - start) / 60, path)
    if procs.distributed:
        dist.barrier()
    return path
