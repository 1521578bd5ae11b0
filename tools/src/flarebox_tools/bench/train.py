"""Training throughput: optimiser steps per second of each demo network, our trainer against a bare
torch loop over the same network, batch and patch, and what each lever gives.

    make bench-train                                  # every demo network
    make bench-train BENCH_ARGS="--networks task2 --steps 12"

Bare loop: one fixed random batch, forward, nnU-Net's deep-supervision loss, backward, AdamW step
(torch's defaults); nothing else. Trainer:
`flarebox_tools.training.train` on phantoms written at the network's own spacing
(so the cache is quick to make), timed by its own epoch timestamps after a first warm-up epoch:
sampling, augmentation, the step and its bookkeeping. Levers, each against the bare loop: channels-
last-3d tensors, AdamW's foreach implementation (torch's default on the CPU is a loop over the
parameters), one thread instead of all, bf16 autocast (fast only where the CPU has AVX-512 BF16
or AMX; elsewhere oneDNN emulates it), batches made in a worker process or inline, smaller patches.
All rows of a network run in one process, one after another, so they share the machine's state.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

BARE_WARMUP = 2
# the patches each demo used before (or would use at a finer grid), to show what the grid costs
OTHER_PATCHES = {"task2": [(40, 128, 128)], "task1": [(48, 96, 96)], "task3": [(32, 96, 96)]}


def networks() -> dict[str, tuple[object, dict]]:
    """name -> (NetworkSpec, the trainer settings its demo uses)."""
    from flarebox_tools.training.demo import DEMO_TRAINING, TASKS
    from flarebox_tools.training.transfer_demo import DEMO_NETWORK

    out = {name: (task.network, {**DEMO_TRAINING, **task.training}) for name, task in TASKS.items()}
    out["task3"] = (DEMO_NETWORK, dict(DEMO_TRAINING))
    return out


def model_folder(spec, label_set: str, folder: Path) -> Path:
    from flarebox_tools.phantoms import LESION_LABELS, ORGAN_LABELS
    from flarebox_tools.training.plans import write_plans

    labels = LESION_LABELS if label_set == "lesion" else ORGAN_LABELS
    write_plans(folder, spec, labels, channel_name="CT")
    return folder


def bare_steps_per_s(model_dir: Path, batch: int, patch: tuple[int, int, int], steps: int, *, threads: int,
                     device: str = "cpu", channels_last: bool = False, amp: torch.dtype | None = None,
                     warmup: int = BARE_WARMUP, foreach: bool | None = None) -> float:
    from flarebox.models import build_network, load_plan
    from flarebox_tools.training.loss import deep_supervision_loss
    from flarebox_tools.training.trainer import he_init

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plan = load_plan(model_dir)
    network = build_network(plan, deep_supervision=True)
    network.apply(he_init)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    network.to(device, memory_format=layout).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, foreach=foreach)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    x = torch.randn(batch, 1, *patch, device=device).to(memory_format=layout)
    y = torch.randint(0, plan.num_classes, (batch, *patch), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            outputs = network(x)
        loss = deep_supervision_loss(outputs, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    synchronize(device)
    return steps / (time.perf_counter() - start)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def trainer_steps_per_s(spec, settings: dict, label_set: str, work: Path, steps: int, **changes) -> float:
    from flarebox_tools.phantoms import write_dataset
    from flarebox_tools.training.config import TrainConfig, replace
    from flarebox_tools.training.trainer import train

    raw = work / "raw"
    if not (raw / "dataset.json").is_file():
        write_dataset(raw, 4, 0, label_set=label_set, spacing_zyx_mm=spec.spacing_zyx_mm)
    torch.set_num_threads(changes.pop("threads", torch.get_num_threads()))
    config = replace(TrainConfig(), **{**settings, "epochs": 3, "iterations_per_epoch": steps, "validation_cases": 0,
                                       **changes})
    model = work / f"model_{time.monotonic_ns()}"
    path = train(raw, model, config, network_spec=spec, cache_dir=work / "cache", resume=False)
    history = torch.load(path, weights_only=False)["logging"]
    seconds = history["epoch_end_timestamps"][-1] - history["epoch_start_timestamps"][1]
    return 2 * steps / seconds


def row(label: str, value: float, reference: float) -> None:
    print(f"  {label:58s} {value:6.3f} steps/s  {1 / value:6.2f} s/step  {value / reference:5.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["task2", "task1", "task3"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row (trainer: two epochs of them)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    args = parser.parse_args()
    from flarebox.cpu import cpu_description
    from flarebox_tools.training.trainer import cpu_has_native_bf16

    threads = torch.get_num_threads()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {threads} threads", flush=True)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    dev = {"device": args.device}
    all_networks = networks()
    for name in args.networks:
        spec, settings = all_networks[name]
        label_set = "lesion" if name == "task1" else "organs"
        batch, patch = settings["batch_size"], spec.patch_zyx
        with tempfile.TemporaryDirectory(prefix=f"bench-train-{name}-") as tmp:
            work = Path(tmp)
            model = model_folder(spec, label_set, work / "plain")
            print(f"\n{name}: {'x'.join(map(str, patch))} patch at {spec.spacing_zyx_mm} mm, batch {batch}", flush=True)
            bare = bare_steps_per_s(model, batch, patch, args.steps, threads=threads, **dev)
            row(f"bare torch loop (f32, contiguous, {threads} threads, {args.device})", bare, bare)
            bare_cl = bare_steps_per_s(model, batch, patch, args.steps, threads=threads, channels_last=True, **dev)
            row("  lever: channels-last-3d", bare_cl, bare)
            row("  lever: AdamW foreach (one kernel for all parameters)",
                bare_steps_per_s(model, batch, patch, args.steps, threads=threads, foreach=True, **dev), bare)
            bare_both = bare_steps_per_s(model, batch, patch, args.steps, threads=threads, channels_last=True,
                                         foreach=True, **dev)
            row("  lever: both", bare_both, bare)
            if threads > 1 and not cuda:
                row("  lever: 1 thread", bare_steps_per_s(model, batch, patch, args.steps, threads=1), bare)
            if cuda:
                for dtype in (torch.float16, torch.bfloat16):
                    row(f"  lever: {dtype} autocast", bare_steps_per_s(model, batch, patch, args.steps,
                                                                      threads=threads, amp=dtype, **dev), bare)
            else:
                native = cpu_has_native_bf16()
                label = "native" if native else "no native bf16 on this CPU: emulated, one step timed"
                row(f"  lever: bf16 autocast ({label})", bare_steps_per_s(
                    model, batch, patch, args.steps if native else 1, threads=threads, amp=torch.bfloat16,
                    warmup=BARE_WARMUP if native else 1), bare)
            for other in OTHER_PATCHES.get(name, ()):
                other_model = model_folder(dataclasses.replace(spec, patch_zyx=other), label_set,
                                           work / f"plain_{'x'.join(map(str, other))}")
                row(f"  grid: patch {'x'.join(map(str, other))} instead (bare)",
                    bare_steps_per_s(other_model, batch, other, args.steps, threads=threads, **dev), bare)
            trainer = trainer_steps_per_s(spec, settings, label_set, work, args.steps, **dev)
            row("our trainer (channels-last, foreach, 1 data worker, augmentation" + (", fp16" if cuda else "") + ")",
                trainer, bare)
            print(f"  {'':58s} {trainer / bare_both:5.2f}x the bare loop with both levers", flush=True)
            row("  trainer, batches made inline (0 workers)",
                trainer_steps_per_s(spec, settings, label_set, work, args.steps, data_workers=0, **dev), bare)
            row("  trainer, contiguous layout",
                trainer_steps_per_s(spec, settings, label_set, work, args.steps, channels_last=False, **dev), bare)


if __name__ == "__main__":
    main()
