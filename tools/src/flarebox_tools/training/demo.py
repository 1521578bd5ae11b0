"""Demo weights from synthetic phantoms: generate data, train a small network of the task's
published topology for the task's number of steps, convert it to OpenVINO (Task 2, f32 and INT8
calibrated on training phantoms), and score it.

    python -m flarebox_tools.training.demo --task task2 --out task2_cpu_organs/weights/model \
        --work .cache/demo/task2 --train-cases 60 --config task2_cpu_organs/config.toml
    python -m flarebox_tools.training.demo --task task1 --out task1_pancancer/weights/model \
        --work .cache/demo/task1 --config task1_pancancer/config.toml

Phantoms, cache and checkpoints stay in --work: stopped (Ctrl-C, SIGTERM, a killed process), the
same command goes on from the last checkpoint. --init-weights starts from a model's weights.

These weights show that the whole path works and what it measures; they are not trained on FLARE
data and are no substitute for the published models. Training uses synthetic anatomy only: the
phantoms' "template" anatomy deforms the real CT's own label map, so it would leak the labels the
model is scored against. Scores (DSC/NSD per class on held-out phantoms at their own spacing, and
for the organ model on the real CT in ../shared/data/real) go to scores.json and scores.md in the
model folder, scored by the engine as the task's container runs it (--config).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flarebox import io
from flarebox.cpu import cpu_description
from flarebox.models import build_network, load_plan
from flarebox_tools import phantoms
from flarebox_tools.metrics import score_case
from flarebox_tools.paths import REAL_CT, REAL_LABELS
from flarebox_tools.training.checkpoint import load, strip_optimizer
from flarebox_tools.training.config import NetworkSpec, TrainConfig, replace
from flarebox_tools.training.trainer import exit_status, train

log = logging.getLogger("flarebox_tools.training")
MODEL_FILES = ("plans.json", "dataset.json", "fold_0", "openvino", "scores.json", "scores.md")


@dataclass(frozen=True)
class DemoTask:
    label_set: str  # phantoms' label set, and the FLARE scoring task ("organs" or "lesion")
    network: NetworkSpec
    training: Mapping[str, Any]  # this task's changes to DEMO_TRAINING
    backend: str  # how the task's container runs the model, for scoring
    precision: str
    openvino: bool  # convert to OpenVINO IR (the task's container runs it)
    int8: bool  # calibrate and write an INT8 IR too
    train_spacing_scale: float  # training phantoms on coarser grids than scanners': faster to make and preprocess
    phases: tuple[str, ...] | None = None  # CT contrast phases of the phantoms, training and held out (None: all)
    long_every: int = 0  # every n-th phantom, training and held out, scanned thorax to thighs (0: none)


TASK2_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))

TASKS = {
    # Published Task 2 model (FLARE.md): PlainConvUNet, 6 stages, these strides and kernels, 2 convs
    # per stage, 2.5 mm isotropic, 40x224x192 inference patch, CT clip [-958, 270], (x + 97.3) / 137.8,
    # 14 classes. Demo: 8..64 features instead of 32..320 (1.5 M instead of 30.7 M parameters: the
    # weights stay a few MB; compute is in the 8- and 16-feature stages at full resolution anyway)
    # and a 32x96x96 patch (8 x 24 x 24 cm), for training and inference alike: a step costs a quarter
    # to a third of 40x128x128's on two cores (docs/training.md), so three to four times the steps; training
    # on one patch but inferring on a larger one halved the validation DSC (instance normalisation
    # then sees far more zero padding than in training). No mirroring: left and right organs differ
    # only by side, and the phantoms come both as LPS and as RAS (rotated 180 degrees, not mirrored).
    "task2": DemoTask(
        label_set="organs",
        network=NetworkSpec(
            features_per_stage=(8, 16, 32, 64, 64, 64), strides_zyx=TASK2_STRIDES,
            kernel_sizes_zyx=((1, 3, 3),) + ((3, 3, 3),) * 5, blocks_per_stage=(2,) * 6,
            spacing_zyx_mm=(2.5, 2.5, 2.5), patch_zyx=(32, 96, 96),
            ct_clip_hu=(-958.0, 270.0), ct_mean_hu=-97.3, ct_std_hu=137.8),
        training={"epochs": 130, "iterations_per_epoch": 40, "mirror_axes": ()},
        backend="openvino", precision="int8", openvino=True, int8=True, train_spacing_scale=1.0),
    # The lightweight alternative for Task 2 (FLARE.md, FZU; flarebox.networks.LightUNet): a 2.5D
    # U-Net of depthwise-separable convolutions with ECA, 16..256 features (0.40 M parameters), 3
    # adjacent slices, CT window [-160, 300] (as (x - 70) / 230, clipped: [-1, 1]). At Task 2's 2.5 mm
    # a 192x192 tile spans 48 cm, a whole abdomen, as the published 192x192 resize does; inference
    # tiles are 32 slices, a batch the CPU runs at once. Trained on 8-slice patches (6 scored) of
    # 160x160, the size of a body-cropped slice, 4 at a time. No deep supervision (one output).
    "task2-light": DemoTask(
        label_set="organs",
        network=NetworkSpec(
            kind="light", features_per_stage=(16, 32, 64, 128, 256),
            strides_zyx=((1, 1, 1),) + ((1, 2, 2),) * 4, kernel_sizes_zyx=((1, 3, 3),) * 5,
            blocks_per_stage=(2,) * 5, spacing_zyx_mm=(2.5, 2.5, 2.5), patch_zyx=(32, 192, 192),
            ct_clip_hu=(-160.0, 300.0), ct_mean_hu=70.0, ct_std_hu=230.0),
        training={"epochs": 60, "iterations_per_epoch": 40, "mirror_axes": (), "patch_zyx": (8, 160, 160),
                  "batch_size": 4, "deep_supervision": False, "validate_every_epochs": 20},
        backend="openvino", precision="int8", openvino=True, int8=True, train_spacing_scale=1.0),
    # Published Task 1 model: ResidualEncoderUNet (nnU-Net ResEnc L, blocks 1,3,4,6,6,6), 1 x 0.8 x 0.8 mm,
    # 96x160x160 patch, CT clip [-900, 619], (x + 52.2) / 268.8, 2 classes. Demo: blocks 1,2,2,2,2,2
    # with 8..64 features (2.0 M parameters instead of 102 M), at 2.5 x 2 x 2 mm with a 32x64x64 patch
    # (8 x 13 x 13 cm): 16x fewer voxels per case, so two CPU cores take 1.6 steps a second, and a
    # 1 cm3 lesion is still 100 voxels. A 48x96x96 patch costs 3.5x a step (docs/training.md) and
    # ~400 steps of it ended at validation DSC 0.00: lesions are rare voxels, hence half the patches
    # forced to hold a lesion (anywhere in the patch: centred ones taught the network that lesions
    # sit at tile centres) and Dice over the batch (nnU-Net's batch Dice, for small structures).
    "task1": DemoTask(
        label_set="lesion",
        network=NetworkSpec(
            features_per_stage=(8, 16, 32, 64, 64, 64), residual=True,
            strides_zyx=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
            kernel_sizes_zyx=((3, 3, 3),) * 6, blocks_per_stage=(1, 2, 2, 2, 2, 2),
            spacing_zyx_mm=(2.5, 2.0, 2.0), patch_zyx=(32, 64, 64),
            ct_clip_hu=(-900.0, 619.0), ct_mean_hu=-52.2, ct_std_hu=268.8),
        training={"epochs": 120, "foreground_oversampling": 0.5, "batch_dice": True},
        # Task 1's container runs torch on the GPU: an IR would be dead weight in its image
        backend="torch", precision="f32", openvino=False, int8=False, train_spacing_scale=1.0,
        # contrast-enhanced CT, as pan-cancer lesion datasets mostly are: in the non-contrast phase the
        # phantoms' solid lesions sit ~17 HU under liver, within its noise (docs/training.md)
        phases=("arterial", "portal-venous")),
    # The locate stage's network (flarebox.locate, [locate] mode = "network"): the 13 organs at 5 mm,
    # whose box the Task 2 model's tiles then keep to. Five stages of 8..32 features (0.38 M
    # parameters), a 48x64x64 patch (24 x 32 x 32 cm). A third of its phantoms are scanned thorax to
    # thighs, so that it learns where the organs end in a long scan, on grids twice as coarse as a
    # scanner's (the network reads 5 mm anyway). Run in f32: its few milliseconds need no INT8.
    "locator": DemoTask(
        label_set="organs",
        network=NetworkSpec(
            features_per_stage=(8, 16, 32, 32, 32), strides_zyx=((1, 1, 1),) + ((2, 2, 2),) * 4,
            kernel_sizes_zyx=((3, 3, 3),) * 5, blocks_per_stage=(2,) * 5,
            spacing_zyx_mm=(5.0, 5.0, 5.0), patch_zyx=(48, 64, 64),
            ct_clip_hu=(-958.0, 270.0), ct_mean_hu=-97.3, ct_std_hu=137.8),
        training={"epochs": 40, "iterations_per_epoch": 40, "mirror_axes": (), "validate_every_epochs": 20},
        backend="openvino", precision="f32", openvino=True, int8=False, train_spacing_scale=2.0, long_every=3),
}

# What a CPU budget of a few thousand steps changes from nnU-Net's recipe, for both tasks
# (DemoTask.training adds more):
DEMO_TRAINING = dict(
    epochs=100,
    iterations_per_epoch=25,
    batch_size=2,
    # AdamW: in a few hundred steps SGD with momentum 0.99 sat on the all-background plateau
    optimizer="adamw", learning_rate=3e-3, weight_decay=3e-5,
    foreground_oversampling=0.5,  # more foreground per step: every step counts when there are few
    rotation_deg=15.0, scale_range=(0.85, 1.25),  # milder: phantoms vary less than scanners
    # nnU-Net's intensity augmentation: a real CT's noise, contrast and sharpness differ from the
    # phantoms', and the model must not lean on the phantoms' exact values
    intensity_augmentation=True,
    # validation runs whole cases through the sliding window on the CPU (minutes each with small
    # patches): every 25 epochs and at the end, with a step of one patch
    validation_cases=2, validate_every_epochs=25, validation_step=1.0, device="cpu",
)


def clear_model_folder(out: Path) -> None:
    """Remove what an earlier demo wrote (and only that)."""
    for name in MODEL_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def score_model(model: Path, task: DemoTask, held_out: Path, task_config: Path | None = None) -> dict:
    """Run the engine on held-out phantoms (and the real CT for organs), on each image's own grid,
    and score with the FLARE rules: with the task's config.toml where given (as its container runs
    the model: body crop, step, precision...), else with the engine's defaults and the task's backend."""
    import tomllib

    from flarebox.config import from_dict
    from flarebox.pipeline import Predictor

    if task_config is not None:
        raw = tomllib.loads(Path(task_config).read_text())
        raw["model"] = {**raw.get("model", {}), "folder": str(Path(model).resolve())}
        raw.setdefault("inference", {}).pop("cache_dir", None)  # scoring fills no image's cache
        raw["inference"]["device"] = "cpu"
        settings = f"{Path(task_config).parent.name}/{Path(task_config).name}, as its container runs it"
    else:
        raw = {"model": {"folder": str(model)},
               "inference": {"backend": task.backend, "precision": task.precision, "device": "cpu"}}
        settings = "the engine's default settings (step 0.5, no body crop)"
    # the config's other paths (the locator's folder) are its own folder's, as when its container runs it
    config = from_dict(raw, Path(task_config).parent if task_config is not None else model)
    predictor = Predictor.from_config(config)
    per_case, seconds = {}, []
    for image in sorted((held_out / "imagesTr").glob(f"*{io.INPUT_SUFFIX}")):
        case_id = image.name[: -len(io.INPUT_SUFFIX)]
        volume = io.read_image(image)
        reference = io.read_image(held_out / "labelsTr" / f"{case_id}.nii.gz").array_zyx.astype(np.uint8)
        start = time.perf_counter()
        labels = predictor.segment(volume)
        seconds.append(time.perf_counter() - start)
        per_case[case_id] = score_case(labels, reference, volume.geometry.spacing_zyx_mm, task.label_set)
    names = next(iter(per_case.values())).keys()
    mean = {n: {m: float(np.nanmean([s[n][m] for s in per_case.values()])) for m in ("dsc", "nsd")} for n in names}
    inf = config.inference
    result = {"backend": f"{inf.backend} {inf.precision}", "settings": settings,
              "held_out_phantoms": {"cases": len(per_case), "mean": mean, "per_case": per_case,
                                    "seconds_per_case": float(np.mean(seconds))}}
    if task.label_set == "organs" and REAL_LABELS.is_file():
        volume = io.read_image(REAL_CT)
        reference = io.read_image(REAL_LABELS).array_zyx.astype(np.uint8)
        result["real_ct"] = {"image": REAL_CT.name, "labels": REAL_LABELS.name,
                             "scores": score_case(predictor.segment(volume), reference,
                                                  volume.geometry.spacing_zyx_mm, "organs")}
    return result


def box_scores(model: Path, held_out: Path) -> dict:
    """What the locate stage does with this model on each held-out phantom (Task 2's settings: body
    crop at -500 HU, 20 mm margin): the share of the scan its box keeps, and the share of each
    case's organ voxels inside the box (1.0: the box loses nothing)."""
    from flarebox.backends import load_backend
    from flarebox.config import LocateConfig
    from flarebox.locate import Locator

    plan = load_plan(model)
    locator = Locator(plan, load_backend(plan, precision="f32"), LocateConfig(mode="network", folder=model),
                      body_threshold=-500.0)
    per_case = {}
    for image in sorted((held_out / "imagesTr").glob(f"*{io.INPUT_SUFFIX}")):
        case_id = image.name[: -len(io.INPUT_SUFFIX)]
        volume = io.read_image(image)
        reference = io.read_image(held_out / "labelsTr" / f"{case_id}.nii.gz").array_zyx
        start = time.perf_counter()
        located = locator.locate(volume.array_zyx, volume.geometry.spacing_zyx_mm)
        seconds = time.perf_counter() - start
        inside = np.zeros(reference.shape, bool)
        inside[tuple(slice(a, b) for a, b in located.box or ((0, n) for n in reference.shape))] = True
        organs = reference > 0
        per_case[case_id] = {"slices": int(reference.shape[0]), "kept": float(inside.mean()),
                             "organ_voxels_inside": float(inside[organs].mean()) if organs.any() else 1.0,
                             "seconds": seconds, "note": located.note}
    return per_case


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"  # NaN: the class is absent from every case


def markdown(scores: dict, title: str) -> str:
    held = scores["held_out_phantoms"]
    real = scores.get("real_ct", {}).get("scores")
    t = scores["training"]
    lines = [f"# {title}", "",
             "Demo weights trained on synthetic phantoms, not on FLARE data. Scored by the engine "
             f"({scores['backend']}, {scores.get('settings', 'the engine defaults')}) on each image's own grid "
             "with the FLARE rules.", "",
             f"Training: {t['steps']} steps ({t['epochs']} epochs x {t['iterations_per_epoch']}, batch "
             f"{t['batch_size']}) in {t['minutes']:.1f} min of training on {t['device']} ({t['cpu']}), "
             f"{t['training_cases']} training phantoms; {t['parameters'] / 1e6:.2f} M parameters. Made by "
             "`make demo-weights`.", "",
             f"| class | DSC ({held['cases']} held-out phantoms) | NSD |" + (" DSC (real CT) | NSD (real CT) |"
                                                                          if real else ""),
             "|---|---|---|" + ("---|---|" if real else "")]
    for name, s in held["mean"].items():
        row = f"| {name} | {_fmt(s['dsc'])} | {_fmt(s['nsd'])} |"
        if real:
            row += f" {_fmt(real[name]['dsc'])} | {_fmt(real[name]['nsd'])} |"
        lines.append(row)
    mean_dsc = np.nanmean([s["dsc"] for s in held["mean"].values()])
    mean_nsd = np.nanmean([s["nsd"] for s in held["mean"].values()])
    row = f"| **mean** | {mean_dsc:.3f} | {mean_nsd:.3f} |"
    if real:
        row += (f" {np.nanmean([s['dsc'] for s in real.values()]):.3f} |"
                f" {np.nanmean([s['nsd'] for s in real.values()]):.3f} |")
    lines += [row, ""]
    if real:
        lines.append("Real CT: ../shared/data/real/ts_ct_sm (3 mm, a 9 cm abdominal slab, TotalSegmentator labels). "
                     "A class absent from both its labels and the prediction scores 1, as FLARE scores it.")
    if "boxes" in scores:
        lines += ["", "The locate stage with this model (body crop at -500 HU, 20 mm margin), per held-out phantom:",
                  "",
                  "| case | slices | scan kept | organ voxels inside the box | seconds |", "|---|---|---|---|---|"]
        for case, b in scores["boxes"].items():
            lines.append(f"| {case} | {b['slices']} | {b['kept']:.1%} | {b['organ_voxels_inside']:.4f} | "
                         f"{b['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


SHIPPED = ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth")


def run(task_name: str, out: Path, *, work: Path, n_train: int, n_held_out: int, seed: int,
        minutes: float | None = None, task_config: Path | None = None, init_weights: Path | None = None) -> dict:
    """Generate, train, convert, score; returns the scores written to out/scores.json.

    Everything but the shipped model lives in `work` (phantoms, cache, the training's checkpoints),
    so rerunning the same command after an interruption goes on where it stopped. minutes: a total
    training-time budget instead of the task's epochs (the schedule then runs on time)."""
    task = TASKS[task_name]
    start = time.perf_counter()
    raw = phantoms.write_dataset(work / "raw", n_train, seed, label_set=task.label_set,
                                 spacing_scale=task.train_spacing_scale, phases=task.phases, keep_existing=True,
                                 long_every=task.long_every)
    held_out = phantoms.write_dataset(work / "held_out", n_held_out, seed + 10_000, label_set=task.label_set,
                                      phases=task.phases, keep_existing=True, long_every=task.long_every)
    log.info("phantoms: %d for training, %d held out, ready in %.0fs", n_train, n_held_out,
             time.perf_counter() - start)

    changes = {**DEMO_TRAINING, **task.training, "seed": seed}
    if minutes is not None:
        changes["time_limit_minutes"] = minutes
    if init_weights is not None:
        changes["init_weights"] = str(init_weights)
    config = replace(TrainConfig(), **changes)
    model = work / "model"
    final = train(raw, model, config, network_spec=task.network, cache_dir=work / "preprocessed")
    scores = ship(task_name, final, out, raw=raw, held_out=held_out, task_config=task_config)
    log.info("demo %s done in %.1f min (training %.1f min over all its runs)", task_name,
             (time.perf_counter() - start) / 60, scores["training"]["minutes"])
    return scores


def install_model(model: Path, out: Path) -> None:
    """What a container needs of a trained model folder into `out`, after removing what an earlier
    demo wrote there: plans, dataset and the final checkpoint without optimizer state."""
    out.mkdir(parents=True, exist_ok=True)
    clear_model_folder(out)
    for name in SHIPPED:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model / name, out / name)
    strip_optimizer(out / SHIPPED[-1])


def ship(task_name: str, final: Path, out: Path, *, raw: Path, held_out: Path,
         task_config: Path | None = None) -> dict:
    """The trained model into `out`: plans, dataset and the final checkpoint without optimizer state,
    OpenVINO IR where the task runs it (INT8 calibrated on four training phantoms), scores."""
    task = TASKS[task_name]
    state = load(final)
    install_model(final.parents[1], out)
    if task.openvino:
        from flarebox_tools.convert import convert_model

        calibration = sorted((raw / "imagesTr").glob(f"*{io.INPUT_SUFFIX}"))[:4] if task.int8 else []
        convert_model(out, calibration_images=calibration, tiles_per_image=4)
    scores = score_model(out, task, held_out, task_config)
    if task_name == "locator":
        scores["boxes"] = box_scores(out, held_out)
    progress = state["logging"]["progress"]
    config = state["logging"]["train_config"]
    scores["training"] = {
        "minutes": progress["training_seconds"] / 60, "device": config["device"], "epochs": state["current_epoch"],
        "steps": progress["steps_done"], "iterations_per_epoch": config["iterations_per_epoch"],
        "batch_size": config["batch_size"],
        "training_cases": len(list((raw / "imagesTr").glob(f"*{io.INPUT_SUFFIX}"))) - config["validation_cases"],
        "validation": state["logging"]["validation"][-1:], "cpu": cpu_description(),
        "parameters": int(sum(p.numel() for p in build_network(load_plan(out)).parameters())),
        "config": config,
    }
    (out / "scores.json").write_text(json.dumps(scores, indent=2, default=list) + "\n")
    (out / "scores.md").write_text(markdown(scores, f"{task_name} demo model"))
    return scores


def rescore(task_name: str, out: Path, *, work: Path, seed: int, n_held_out: int,
            task_config: Path | None = None) -> dict:
    """Score an installed demo model again, as its container now runs it (after a change to the
    task's config or the engine), keeping what scores.json says of its training."""
    task = TASKS[task_name]
    held_out = phantoms.write_dataset(work / "held_out", n_held_out, seed + 10_000, label_set=task.label_set,
                                      phases=task.phases, keep_existing=True, long_every=task.long_every)
    before = json.loads((out / "scores.json").read_text())
    scores = score_model(out, task, held_out, task_config)
    if task_name == "locator":
        scores["boxes"] = box_scores(out, held_out)
    scores["training"] = before["training"]
    (out / "scores.json").write_text(json.dumps(scores, indent=2, default=list) + "\n")
    (out / "scores.md").write_text(markdown(scores, f"{task_name} demo model"))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools demo", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--minutes", type=float, help="total training time instead of the task's epochs")
    parser.add_argument("--train-cases", type=int, default=40, help="phantoms to train on (2 of them validate)")
    parser.add_argument("--held-out", type=int, default=10, help="phantoms to score on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", help="the task's config.toml: score the model as its container runs it")
    parser.add_argument("--init-weights", help="start from this checkpoint (e.g. the bundled model's, to train on)")
    parser.add_argument("--rescore", action="store_true",
                        help="no training: score the model in --out again as --config now runs it")
    parser.add_argument("--work", required=True,
                        help="phantoms, cache and checkpoints: rerun with the same folder to go on where it stopped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.rescore:
        rescore(args.task, Path(args.out).resolve(), work=Path(args.work).resolve(), seed=args.seed,
                n_held_out=args.held_out, task_config=Path(args.config) if args.config else None)
        return 0
    return exit_status(lambda: run(
        args.task, Path(args.out).resolve(), minutes=args.minutes, n_train=args.train_cases,
        n_held_out=args.held_out, seed=args.seed, work=Path(args.work).resolve(),
        task_config=Path(args.config) if args.config else None,
        init_weights=Path(args.init_weights).resolve() if args.init_weights else None))


if __name__ == "__main__":
    raise SystemExit(main())
