"""The training loop: one process, or one per GPU/CPU rank under `torchrun` with torch DDP.

    python -m flarebox.training train --dataset RAW --model MODEL_DIR [--config train.toml]
    torchrun --standalone --nproc_per_node 2 -m flarebox.training train --dataset RAW --model MODEL_DIR

MODEL_DIR must hold plans.json and dataset.json (models.write_model_folder); the checkpoint goes to
MODEL_DIR/fold_<k>/checkpoint_final.pth with nnU-Net's keys. Under DDP every rank samples its own
patches (seeded by rank), gradients are averaged by DDP, and rank 0 validates and saves.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flarebox.backends.torch_runtime import TorchBackend
from flarebox.metrics import dice
from flarebox.models import build_network, load_plan, save_checkpoint
from flarebox.sliding_window import predict_logits
from flarebox.training.augment import intensity, spatial
from flarebox.training.config import TrainConfig
from flarebox.training.data import Sample, load_dataset
from flarebox.training.loss import deep_supervision_loss
from flarebox.training.sampling import foreground_index, sample_batch

log = logging.getLogger("flarebox.training")


def he_init(module: torch.nn.Module) -> None:
    """nnU-Net's initialisation: He normal with the LeakyReLU slope, zero biases."""
    if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
        torch.nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def poly_lr(initial: float, epoch: int, epochs: int) -> float:
    return initial * (1 - epoch / epochs) ** 0.9


def validate(network: torch.nn.Module, samples: list[Sample], plan, device: str) -> dict[int, float]:
    """Mean DSC per class of sliding-window predictions on held-out preprocessed cases."""
    network.eval()
    module = getattr(network, "module", network)
    deep = module.decoder.deep_supervision
    module.decoder.deep_supervision = False
    backend = TorchBackend([module], plan.patch_zyx, plan.num_classes, device=device)
    scores: dict[int, list[float]] = {}
    for sample in samples:
        labels = predict_logits(sample.image, backend).argmax(0)
        for c in range(1, plan.num_classes):
            if (sample.labels == c).any():
                scores.setdefault(c, []).append(dice(labels == c, sample.labels == c))
    module.decoder.deep_supervision = deep
    network.train()
    return {c: float(np.mean(v)) for c, v in sorted(scores.items())}


def train(dataset_dir: str | Path, model_dir: str | Path, config: TrainConfig, fold: int = 0) -> Path:
    """Train one fold; returns the checkpoint path (on every rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = config.device
    if world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    model_dir = Path(model_dir)
    plan = load_plan(model_dir)
    cache = model_dir / "preprocessed"
    if rank == 0:
        samples = load_dataset(dataset_dir, plan, cache)
    if world > 1:
        dist.barrier()
    if rank != 0:
        samples = load_dataset(dataset_dir, plan, cache)
    n_val = min(config.validation_cases, max(0, len(samples) - 1))
    train_set, val_set = samples[: len(samples) - n_val], samples[len(samples) - n_val:]
    index = foreground_index(train_set)
    patch = config.patch_zyx or plan.patch_zyx

    torch.manual_seed(config.seed)  # same initial weights everywhere; DDP also broadcasts rank 0's
    network = build_network(plan, deep_supervision=config.deep_supervision)
    network.apply(he_init)
    network.to(device).train()
    if world > 1:
        network = torch.nn.parallel.DistributedDataParallel(network)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(network.parameters(), lr=config.learning_rate, momentum=0.99, nesterov=True,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    rng = np.random.default_rng([config.seed, rank])
    gen = torch.Generator().manual_seed(config.seed * 1000 + rank)
    history: dict[str, list] = {"train_losses": [], "val_dice": [], "lrs": []}
    start = time.perf_counter()
    epoch = 0
    planned = config.epochs  # with a time limit, the poly schedule is fitted to it after one epoch
    for epoch in range(config.epochs):
        if epoch == 1 and config.time_limit_minutes > 0:
            planned = min(config.epochs, max(2, int(60 * config.time_limit_minutes / (time.perf_counter() - start))))
        lr = poly_lr(config.learning_rate, epoch, planned)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_start, losses = time.perf_counter(), []
        for _ in range(config.iterations_per_epoch):
            images, labels = sample_batch(train_set, index, config.batch_size, patch, rng,
                                          config.foreground_oversampling)
            x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
            if config.spatial_augmentation:
                x, y = spatial(x, y, gen)
            if config.intensity_augmentation:
                x = intensity(x, gen)
            optimizer.zero_grad(set_to_none=True)
            loss = deep_supervision_loss(network(x.to(device)), y.to(device), config.labelled_classes)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()
            losses.append(float(loss.detach()))
        history["train_losses"].append(float(np.mean(losses)))
        history["lrs"].append(lr)
        last = epoch >= planned - 1
        out_of_time = config.time_limit_minutes > 0 and time.perf_counter() - start > 60 * config.time_limit_minutes
        if world > 1:  # every rank must agree to stop, or DDP hangs
            flag = torch.tensor([float(out_of_time)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        message = (f"epoch {epoch + 1}/{planned}: loss {history['train_losses'][-1]:.4f} lr {lr:.5f} "
                   f"{time.perf_counter() - epoch_start:.1f}s")
        if rank == 0 and val_set and ((epoch + 1) % config.validate_every == 0 or last or out_of_time):
            scores = validate(network, val_set, plan, device)
            history["val_dice"].append({"epoch": epoch + 1, **{str(c): s for c, s in scores.items()}})
            message += f" | val DSC {np.mean(list(scores.values())):.3f}"
        if rank == 0:
            log.info(message)
        if out_of_time or last:
            if rank == 0 and out_of_time:
                log.info("time limit of %.1f min reached after %d epochs", config.time_limit_minutes, epoch + 1)
            break
    path = model_dir / f"fold_{fold}" / "checkpoint_final.pth"
    if rank == 0:
        save_checkpoint(network, path, fold=fold, epoch=epoch + 1, logging=history)
    if world > 1:
        # DDP keeps replicas identical by averaging gradients; check it rather than trust it.
        checksum = torch.stack([p.detach().double().sum() for p in network.parameters()]).sum().reshape(1).cpu()
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        if rank == 0:
            values = [float(g) for g in gathered]
            log.info("ranks %d: parameter checksums %s (%s)", world, values,
                     "in sync" if max(values) - min(values) <= 1e-9 * max(1.0, abs(values[0])) else "DIVERGED")
        dist.barrier()
        dist.destroy_process_group()
    return path
