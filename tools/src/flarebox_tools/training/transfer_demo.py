"""Task 3 demo weights: the transfer pipeline (flarebox_tools.training.transfer) on phantoms, on the CPU.

    python -m flarebox_tools.training.transfer_demo --out task3_mri_transfer/weights/model \
        --mind-out task3_mri_transfer/weights/mind_model --work /tmp/task3-demo

Data: labelled CT phantoms; MRI-like phantom patients, each scanned as T1 and T2 of the same anatomy
(flarebox_tools.phantoms.generate_patient_sequences), whose labels the pipeline never sees (they only score
its steps); held-out MRI patients to score on. The patient moves between the two scans: the T2 is
written in the T1's frame (see `in_scanner_frame`), so the anatomy is misaligned in world space and
step 5's registration has something to undo. Three models are scored on the held-out T1s and T2s:
the MIND model alone (zero-shot on MRI), the final model, and a model trained on the CT only
(intensity input, z-score), into scores.json and scores.md of the final model's folder.

Small networks and minutes of training on two CPU cores: the numbers show the path works and how the
pieces compare at this budget, not what the method reaches with real data and GPU-days.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from flarebox import io
from flarebox_tools import phantoms
from flarebox_tools.metrics import ORGAN_NAMES, score_case
from flarebox_tools.training.checkpoint import strip_optimizer
from flarebox_tools.training.config import NetworkSpec, TrainConfig, replace
from flarebox_tools.training.demo import DEMO_TRAINING, install_model
from flarebox_tools.training.transfer import N_ORGANS, TransferConfig, predictor_for
from flarebox_tools.training.transfer import run as run_pipeline

log = logging.getLogger("flarebox_tools.training")

# Task 3's published model is a 6-stage PlainConvUNet at 2.5 x 0.78 x 0.78 mm with a 40x192x224
# patch (transfer.TASK3_NETWORK). The demo keeps 6 stages but uses 8..64 features and a coarse
# 4 x 3.5 x 3.5 mm grid with a 32x64x64 patch (128 x 224 x 224 mm): a few minutes per training on two
# shared cores must see enough patches to learn anything (a 32x96x96 patch took 6 s per step there).
DEMO_NETWORK = NetworkSpec(
    features_per_stage=(8, 16, 32, 64, 64, 64),
    strides_zyx=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
    kernel_sizes_zyx=((1, 3, 3),) + ((3, 3, 3),) * 5, blocks_per_stage=(2,) * 6,
    spacing_zyx_mm=(4.0, 3.5, 3.5), patch_zyx=(32, 64, 64), normalization="ZScoreNormalization")
SEQUENCES = ("t1", "t2")
DEMO_EPOCHS = 80  # x 25 steps, for each of the four trainings


def in_scanner_frame(sequences: dict[str, phantoms.Phantom]) -> dict[str, phantoms.Phantom]:
    """Every sequence written with the first one's origin and direction. generate_patient_sequences
    moves each sequence's grid with the patient, and its header records that move, so in world space
    the anatomy of all sequences coincides. A scanner records every series in its own fixed frame:
    the patient's motion then shows as moved anatomy, which is what registration must undo."""
    first = next(iter(sequences.values()))
    return {name: dataclasses.replace(p, origin_xyz_mm=first.origin_xyz_mm, direction=first.direction)
            for name, p in sequences.items()}


def write_mri_patients(images_dir: Path, truth_dir: Path, n_patients: int, seed: int, *,
                       spacing_scale: float = 1.0, prefix: str = "mri") -> list[str]:
    """<patient>_<sequence>_0000.nii.gz images and <patient>_<sequence>.nii.gz truth; patient n uses
    seed + n. Returns the case ids."""
    cases = []
    for n in range(n_patients):
        patient = f"{prefix}{seed + n:04d}"
        sequences = in_scanner_frame(phantoms.generate_patient_sequences(seed + n, SEQUENCES,
                                                                         spacing_scale=spacing_scale))
        for name, phantom in sequences.items():
            phantoms.write_case(phantom, images_dir, truth_dir, f"{patient}_{name}")
            cases.append(f"{patient}_{name}")
    # write_case names images <case>_0000.nii.gz and labels <case>.nii.gz: the pipeline's conventions
    return cases


def score_on(model_dir: Path, images_dir: Path, truth_dir: Path) -> dict:
    """The engine (as the task's container runs it, on the CPU) on each held-out image, scored on the
    image's own grid with the FLARE rules."""
    predictor = predictor_for(model_dir, "cpu")
    per_case, seconds = {}, []
    for image in sorted(images_dir.glob(f"*{io.INPUT_SUFFIX}")):
        case_id = image.name[: -len(io.INPUT_SUFFIX)]
        volume = io.read_image(image)
        start = time.perf_counter()
        labels = predictor.segment(volume)
        seconds.append(time.perf_counter() - start)
        truth = io.read_image(truth_dir / f"{case_id}.nii.gz")
        per_case[case_id] = score_case(labels, np.rint(truth.array_zyx).astype(np.uint8),
                                       truth.geometry.spacing_zyx_mm, "organs")
    mean = {name: {m: float(np.mean([c[name][m] for c in per_case.values()])) for m in ("dsc", "nsd")}
            for name in ORGAN_NAMES}
    by_sequence = {}
    for sequence in SEQUENCES:
        cases = [c for c in per_case if c.endswith(f"_{sequence}")]
        by_sequence[sequence] = {m: float(np.mean([s[m] for c in cases for s in per_case[c].values()]))
                                 for m in ("dsc", "nsd")}
    return {"per_case": per_case, "mean": mean, "by_sequence": by_sequence, "cases": len(per_case),
            "seconds_per_case": float(np.mean(seconds))}


def trained_epochs(model_dir: Path) -> int:
    """Epochs the model's final checkpoint went through (a time limit may end training early)."""
    from flarebox_tools.training.checkpoint import load

    return int(load(model_dir / "fold_0" / "checkpoint_final.pth")["current_epoch"])


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def markdown(scores: dict) -> str:
    models = scores["models"]
    names = list(models)
    lines = ["# Task 3 demo model (MRI, transfer from labelled CT)", "",
             "Demo weights trained on synthetic phantoms, not on FLARE data, by "
             "`python -m flarebox_tools.training.transfer_demo` (the six-step pipeline of "
             "`flarebox_tools.training.transfer`). Scored by the engine (torch, CPU) on "
             f"{scores['held_out']['images']} held-out MRI-like phantom images ({scores['held_out']['patients']} "
             "patients x T1 and T2) on each image's own grid with the FLARE rules. The pipeline never saw MRI "
             "labels.", "",
             "| organ | " + " | ".join(f"{n} DSC | {n} NSD" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for organ in ORGAN_NAMES:
        lines.append(f"| {organ} | " + " | ".join(f"{_fmt(models[n]['mean'][organ]['dsc'])} | "
                                                   f"{_fmt(models[n]['mean'][organ]['nsd'])}" for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(
        f"{_fmt(np.mean([s['dsc'] for s in models[n]['mean'].values()]))} | "
        f"{_fmt(np.mean([s['nsd'] for s in models[n]['mean'].values()]))}" for n in names) + " |")
    for sequence in SEQUENCES:
        lines.append(f"| mean on {sequence.upper()} | " + " | ".join(
            f"{_fmt(models[n]['by_sequence'][sequence]['dsc'])} | {_fmt(models[n]['by_sequence'][sequence]['nsd'])}"
            for n in names) + " |")
    lines += ["", "Models: " + "; ".join(f"**{n}**: {models[n]['what']} ({models[n]['epochs']} epochs)"
                                         for n in names) + ".", ""]
    quality = scores.get("pipeline_quality", {})
    if quality:
        lines += ["Pipeline steps on the training MRI, scored against the phantoms' labels (which the pipeline "
                  "never reads):", "", "| step | DSC | NSD | images |", "|---|---|---|---|"]
        for step, q in quality.items():
            lines.append(f"| {step} | {_fmt(q['dsc'])} | {_fmt(q['nsd'])} | {q['cases']} |")
        lines.append("")
    sel = scores["selection"]
    topped = sel["kept"] > sel["passed"]
    t = scores["training"]
    lines += [f"Step 3: {sel['passed']} of {sel['of']} T1 pseudo-labels held >= {sel['rule']['min_organs']} of "
              f"{N_ORGANS} organs" + (f"; relaxed: the {sel['kept']} most complete were kept (organ counts "
                                      f"{sorted((sel['organ_counts'][c] for c in sel['selected']), reverse=True)})"
                                      if topped else "") + ".", "",
              "Time per step: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in scores["step_seconds"].items())
              + ". Epochs trained: " + ", ".join(f"{k} {v}" for k, v in scores.get("trained_epochs", {}).items())
              + f"; {t['config']['epochs']} epochs x {t['config']['iterations_per_epoch']} steps (batch "
              f"{t['config']['batch_size']})" + (f" or {t['minutes_limit']:g} min per training, whichever came first,"
                                                  if t["minutes_limit"] else "") + " on "
              f"{t['device']}; {t['parameters'] / 1e6:.2f} M parameters per network; network spacing "
              f"{' x '.join(f'{s:g}' for s in DEMO_NETWORK.spacing_zyx_mm)} mm, patch "
              f"{'x'.join(str(p) for p in DEMO_NETWORK.patch_zyx)}.", ""]
    return "\n".join(lines)


def run(out: Path, mind_out: Path | None, work: Path, *, minutes: float | None, n_ct: int, n_mri: int,
        n_held_out: int, seed: int, min_organs: int, min_selected: int, epochs: int = DEMO_EPOCHS) -> dict:
    start = time.perf_counter()
    ct, mri, truth = work / "ct", work / "mri", work / "mri_truth"
    held_images, held_truth = work / "held_out" / "images", work / "held_out" / "truth"
    if not (work / "data.done").is_file():
        phantoms.write_dataset(ct, n_ct, seed, modality="ct", spacing_scale=2.0)
        write_mri_patients(mri, truth, n_mri, seed + 1000, spacing_scale=2.0)
        write_mri_patients(held_images, held_truth, n_held_out, seed + 10_000)
        (work / "data.done").write_text("phantoms written\n")
    log.info("phantoms ready in %.0fs", time.perf_counter() - start)

    # no mirroring: left and right organs differ only by their side
    changes = {**DEMO_TRAINING, "epochs": epochs, "mirror_axes": (), "seed": seed}
    if minutes is not None:
        changes["time_limit_minutes"] = minutes
    train = replace(TrainConfig(), **changes)
    config = TransferConfig(train=train, network=DEMO_NETWORK, min_organs=min_organs, min_selected=min_selected,
                            device="cpu")
    final = run_pipeline(ct, mri, work / "pipeline", config, truth)

    # the baseline: the same network on the CT alone, intensity input (z-score), same budget
    ct_only = work / "ct_only_model"
    if not (ct_only / "fold_0" / "checkpoint_final.pth").is_file():
        from flarebox_tools.training.trainer import train as train_model

        t0 = time.perf_counter()
        path = train_model(ct, ct_only, train, network_spec=DEMO_NETWORK, cache_dir=work / "pipeline" / "cache")
        strip_optimizer(path)
        (work / "ct_only.seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")

    models = {
        "MIND model, zero-shot": (work / "pipeline" / "1_mind_model",
                                  "step 1, trained on MIND-SSC descriptors of the labelled CT only"),
        "final model": (final, "step 6, trained on every MRI with its pseudo-labels + the CT"),
        "CT-only model": (ct_only, "intensity input, trained on the labelled CT only"),
    }
    scores: dict = {"models": {}}
    for name, (folder, what) in models.items():
        log.info("scoring %s on %d held-out images", name, 2 * n_held_out)
        scores["models"][name] = score_on(folder, held_images, held_truth) | {"what": what,
                                                                            "epochs": trained_epochs(folder)}
    quality = json.loads((work / "pipeline" / "quality.json").read_text())
    scores["pipeline_quality"] = {step: q["mean"] for step, q in quality.items()}
    scores["selection"] = json.loads((work / "pipeline" / "3_selected.json").read_text())
    step_seconds = {step: json.loads((work / "pipeline" / f"{step}.done.json").read_text())["seconds"]
                    for step in ("1_mind_model", "2_pseudo_t1", "3_selected", "4_t1_model", "5_carried_labels",
                                 "6_final_model")}
    step_seconds["CT-only model"] = float((work / "ct_only.seconds").read_text())
    scores["step_seconds"] = step_seconds
    scores["trained_epochs"] = {name: trained_epochs(folder) for name, folder in (
        ("1_mind_model", work / "pipeline" / "1_mind_model"), ("4_t1_model", work / "pipeline" / "4_t1_model"),
        ("6_final_model", final), ("CT-only model", ct_only))}
    from flarebox.models import build_network, load_plan

    scores["training"] = {"minutes_limit": minutes, "device": train.device, "config": vars(train),
                          "parameters": int(sum(p.numel() for p in build_network(load_plan(final)).parameters()))}
    scores["held_out"] = {"patients": n_held_out, "images": 2 * n_held_out, "seed": seed + 10_000}
    scores["minutes"] = (time.perf_counter() - start) / 60

    install_model(final, out)
    (out / "scores.json").write_text(json.dumps(scores, indent=2, default=list) + "\n")
    (out / "scores.md").write_text(markdown(scores))
    if mind_out is not None:
        install_model(work / "pipeline" / "1_mind_model", mind_out)
        (mind_out / "scores.md").write_text("# Task 3 MIND model (zero-shot mode)\n\nScores: see ../model/scores.md, "
                                            "column 'MIND model, zero-shot'.\n")
    log.info("demo done in %.1f min", scores["minutes"])
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools transfer-demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the final model (Task 3's weights/model)")
    parser.add_argument("--mind-out", help="folder for the MIND model (Task 3's weights/mind_model)")
    parser.add_argument("--work", required=True, help="phantoms, pipeline steps and caches (rerun to resume)")
    parser.add_argument("--minutes", type=float,
                        help="training time of each of the four trainings instead of --epochs (the schedule then "
                             "runs on time; a step count keeps the models comparable on a machine whose load changes)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs of 25 steps per training")
    parser.add_argument("--ct-cases", type=int, default=20)
    parser.add_argument("--mri-patients", type=int, default=10, help="each gives a T1 and a T2")
    parser.add_argument("--held-out", type=int, default=5, help="held-out patients (T1 + T2 each)")
    parser.add_argument("--min-organs", type=int, default=N_ORGANS, help="step 3's rule (13 = published)")
    parser.add_argument("--min-selected", type=int, default=4,
                        help="fewer T1s pass step 3: keep this many most complete ones (a relaxation)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    from flarebox_tools.training.trainer import exit_status

    return exit_status(lambda: run(
        Path(args.out).resolve(), Path(args.mind_out).resolve() if args.mind_out else None, Path(args.work),
        minutes=args.minutes, n_ct=args.ct_cases, n_mri=args.mri_patients, n_held_out=args.held_out,
        seed=args.seed, min_organs=args.min_organs, min_selected=args.min_selected, epochs=args.epochs))


if __name__ == "__main__":
    raise SystemExit(main())
