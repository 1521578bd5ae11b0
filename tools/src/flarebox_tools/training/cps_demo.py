"""Does cross pseudo supervision help? One demo network trained twice on phantoms with most labels
withheld, without and with CPS, for the same compute, and scored alike.

    python -m flarebox_tools.training.cps_demo --task task2-light --labelled 10 --unlabelled 40 \
        --steps 480 --work .cache/cps/task2-light --config task2_cpu_organs/config_light.toml

The `labelled` phantoms keep their labels; the `unlabelled` ones join the dataset as `unl_<id>`
with an empty label map, declared to annotate no class (`[train] partial_labels`), so that only
CPS learns from them. Without CPS the trainer leaves them out. Same compute: a CPS step trains two
networks, so the CPS run takes half the steps (each run's minutes are reported beside it). Both
runs are converted and scored as demo.py ships a model (held-out phantoms, the real CT), through the
task's config. Results: WORK/cps.json and WORK/cps.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from flarebox import io
from flarebox_tools import phantoms
from flarebox_tools.training.config import TrainConfig, replace
from flarebox_tools.training.demo import DEMO_TRAINING, TASKS, ship
from flarebox_tools.training.trainer import exit_status, train

log = logging.getLogger("flarebox_tools.training")
UNLABELLED_PREFIX = "unl_"


def withheld_dataset(pool: Path, out: Path, labelled: int) -> tuple[int, int]:
    """`out`: the pool's first `labelled` cases as they are, the rest as unlabelled cases (linked
    images, empty label maps). Returns (labelled, unlabelled) counts."""
    images = sorted((pool / "imagesTr").glob(f"*{io.INPUT_SUFFIX}"))
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(images):
        case_id = image.name[: -len(io.INPUT_SUFFIX)]
        name = case_id if n < labelled else UNLABELLED_PREFIX + case_id
        target = out / "imagesTr" / f"{name}{io.INPUT_SUFFIX}"
        labels = out / "labelsTr" / f"{name}.nii.gz"
        if not target.exists():
            os.link(image, target)
        if labels.exists():
            continue
        if n < labelled:
            os.link(pool / "labelsTr" / f"{case_id}.nii.gz", labels)
        else:
            volume = io.read_image(pool / "labelsTr" / f"{case_id}.nii.gz")
            io.write_labels(labels, np.zeros(volume.array_zyx.shape, np.uint8), volume.geometry)
    dataset = json.loads((pool / "dataset.json").read_text())
    dataset["numTraining"] = len(images)
    (out / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    return min(labelled, len(images)), max(len(images) - labelled, 0)


def run(task_name: str, work: Path, *, labelled: int, unlabelled: int, steps: int, seed: int,
        cps_weight: float, task_config: Path | None, same_steps: bool = False) -> dict:
    task = TASKS[task_name]
    start = time.perf_counter()
    pool = phantoms.write_dataset(work / "pool", labelled + unlabelled, seed, label_set=task.label_set,
                                  spacing_scale=task.train_spacing_scale, phases=task.phases, keep_existing=True,
                                  long_every=task.long_every)
    held_out = phantoms.write_dataset(work / "held_out", 10, seed + 10_000, label_set=task.label_set,
                                      phases=task.phases, keep_existing=True, long_every=task.long_every)
    raw = work / "raw"
    counts = withheld_dataset(pool, raw, labelled)
    log.info("%d labelled and %d unlabelled phantoms ready in %.0fs", *counts, time.perf_counter() - start)
    per_epoch = int(task.training.get("iterations_per_epoch", DEMO_TRAINING["iterations_per_epoch"]))
    runs = [("labels_only", 0.0, steps), ("cps", cps_weight, steps // 2)]  # two networks a step: same compute
    if same_steps:
        runs.append(("cps_same_steps", cps_weight, steps))  # as many steps: twice the compute
    results = {}
    for name, weight, run_steps in runs:
        epochs = max(run_steps // per_epoch, 1)
        changes = {**DEMO_TRAINING, **task.training, "seed": seed, "epochs": epochs, "validation_cases": 0,
                   "cps_weight": weight, "cps_ramp_epochs": epochs / 3,
                   "partial_labels": ((UNLABELLED_PREFIX, ()),)}
        config = replace(TrainConfig(), **changes)
        final = train(raw, work / name / "training", config, network_spec=task.network,
                      cache_dir=work / "preprocessed")
        results[name] = _shipped(task_name, final, work / name / "model", raw=raw, held_out=held_out,
                                 task_config=task_config)
    summary = {"task": task_name, "labelled": counts[0], "unlabelled": counts[1], "steps": steps,
               "cps_weight": cps_weight, "runs": results}
    (work / "cps.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    (work / "cps.md").write_text(markdown(summary))
    return summary


def _shipped(task_name: str, final: Path, out: Path, *, raw: Path, held_out: Path,
             task_config: Path | None) -> dict:
    """The run's scores: those of its shipped model when it was shipped from this checkpoint (a
    rerun that adds a run), else ship and score it now."""
    scores = out / "scores.json"
    if scores.exists() and scores.stat().st_mtime > final.stat().st_mtime:
        return json.loads(scores.read_text())
    return ship(task_name, final, out, raw=raw, held_out=held_out, task_config=task_config)


def _mean(scores: dict[str, dict[str, float]], metric: str) -> float:
    return float(np.nanmean([s[metric] for s in scores.values()]))


def markdown(summary: dict) -> str:
    runs = summary["runs"]
    names = list(runs)
    first = runs[names[0]]
    lines = [f"# Cross pseudo supervision, {summary['task']}: {summary['labelled']} labelled + "
             f"{summary['unlabelled']} unlabelled phantoms", "",
             f"Same compute: {summary['steps']} steps with the labels only, half as many (whole epochs) of two "
             f"networks with CPS (weight {summary['cps_weight']}, ramped over the first third)"
             + (", and as many CPS steps as the labels alone got (cps_same_steps: twice the compute)"
                if "cps_same_steps" in runs else "")
             + f". Scored by the engine ({first['backend']}, {first['settings']}).", "",
             "| run | training min | steps | DSC held-out | NSD held-out | DSC real CT | NSD real CT |",
             "|---|---|---|---|---|---|---|"]
    for name, scores in runs.items():
        held = scores["held_out_phantoms"]["mean"]
        real = scores.get("real_ct", {}).get("scores", {})
        t = scores["training"]
        lines.append(f"| {name} | {t['minutes']:.1f} | {t['steps']} | {_mean(held, 'dsc'):.3f} | "
                     f"{_mean(held, 'nsd'):.3f} | {_mean(real, 'dsc') if real else float('nan'):.3f} | "
                     f"{_mean(real, 'nsd') if real else float('nan'):.3f} |")
    lines += ["", "Per organ, DSC / NSD on the held-out phantoms and on the real CT:", "",
              "| organ | " + " | ".join(f"{n} held-out | {n} real CT" for n in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for organ in first["held_out_phantoms"]["mean"]:
        cells = []
        for n in names:
            held = runs[n]["held_out_phantoms"]["mean"][organ]
            real = runs[n].get("real_ct", {}).get("scores", {}).get(organ)
            cells += [f"{held['dsc']:.3f} / {held['nsd']:.3f}",
                      f"{real['dsc']:.3f} / {real['nsd']:.3f}" if real else "–"]
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools cps-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--labelled", type=int, default=10)
    parser.add_argument("--unlabelled", type=int, default=40)
    parser.add_argument("--steps", type=int, default=480, help="steps with the labels only; CPS takes half")
    parser.add_argument("--cps-weight", type=float, default=0.5)
    parser.add_argument("--same-steps", action="store_true",
                        help="also a CPS run of as many steps as the labels-only one (twice its compute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", help="the task's config.toml: score as its container runs the model")
    parser.add_argument("--work", required=True, help="phantoms, runs and results; rerun to go on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return exit_status(lambda: run(args.task, Path(args.work).resolve(), labelled=args.labelled,
                                   unlabelled=args.unlabelled, steps=args.steps, seed=args.seed,
                                   cps_weight=args.cps_weight, same_steps=args.same_steps,
                                   task_config=Path(args.config).resolve() if args.config else None))


if __name__ == "__main__":
    raise SystemExit(main())
