"""Task 3's transfer pipeline: MRI organ models learned from labelled CT and unlabelled MRI, one command.

    flarebox-tools transfer --ct CT_RAW --mri MRI_DIR --work WORK [--config train.toml]
        [--minutes 8] [--t1-sequence t1] [--min-organs 13] [--mri-labels TRUTH_DIR]

In: CT_RAW, an nnU-Net raw dataset with the 13 FLARE organs (imagesTr/<case>_0000.nii.gz,
labelsTr/<case>.nii.gz, dataset.json); MRI_DIR, images named `<patient>_<sequence>_0000.nii.gz`, where
`<sequence>` is the last underscore-separated token (letters and digits: t1, t2, dixonin, ...) and
`<patient>` everything before it, so `amos_0507_t1_0000.nii.gz` and `amos_0507_t2_0000.nii.gz` are two
sequences of patient `amos_0507`. Out: WORK/6_final_model, an nnU-Net model folder for any sequence.

The six steps of the published method (FLARE.md), each writing under WORK and skipped when its
marker WORK/<step>.done.json exists (per-case outputs are also kept, so an interrupted prediction
step resumes at the first missing case):

1. `1_mind_model`: a model on MIND-SSC descriptors (flarebox.mind) of the labelled CT. The
   descriptors describe local structure, not intensity, so the model transfers to MRI as it is.
2. `2_pseudo_t1`: that model on every T1 (MIND computed from the T1), one label map per T1.
3. `3_selected.json`: the T1s whose pseudo-label holds at least `min_organs` of the 13 organs (an
   organ counts when it has at least `min_organ_voxels` voxels). 13 is the published rule; a
   demo-quality MIND model rarely finds all 13: lower it, or set `min_selected` to keep the most
   complete ones when too few pass; both are logged as relaxations.
4. `4_t1_model`: an intensity model trained on the selected T1s and their pseudo-labels
   (`4_t1_dataset`); it labels the T1s that were not selected; `4_t1_labels` holds every T1's labels.
5. `5_carried_labels`: each patient's T1 labels carried to its other sequences by affine registration
   (SimpleITK, Mattes mutual information, multi-resolution) of the T1 onto the other sequence.
6. `6_final_model`: an intensity model on every MRI with labels (T1s and carried) plus the labelled CT
   (`6_final_dataset`); all images z-score normalised per image, as published for Task 3.

Every model shares one [network] spec (defaults: TASK3_NETWORK) and one [train] config, except that
the MIND model reads 12 channels and is trained without mirroring or intensity augmentation (a
mirrored MIND map is not the MIND map of the mirrored image: the +x and -x pairs swap). When truth
labels for the MRI exist (phantoms: `--mri-labels` with `<patient>_<sequence>.nii.gz`), each step's
labels are scored with the FLARE metrics into WORK/quality.json and the log; the pipeline never
uses them otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flarebox import io
from flarebox.errors import CaseError, ConfigError
from flarebox_tools.metrics import ORGAN_NAMES, score_case
from flarebox_tools.phantoms import ORGAN_LABELS
from flarebox_tools.training.config import NetworkSpec, TrainConfig, replace

log = logging.getLogger("flarebox_tools.training")

MRI_NAME = re.compile(r"^(?P<patient>.+)_(?P<sequence>[A-Za-z0-9]+)" + re.escape(io.INPUT_SUFFIX) + "$")
N_ORGANS = len(ORGAN_NAMES)

# The published Task 3 model (FLARE.md): PlainConvUNet, 6 stages, 2.5 x 0.78 x 0.78 mm, patch
# 40x192x224, z-score. FLARE.md gives no strides for it; these are what nnU-Net's planner gives
# such a spacing and patch (no z pooling until in-plane spacing has caught up with 2.5 mm).
TASK3_NETWORK = NetworkSpec(
    features_per_stage=(32, 64, 128, 256, 320, 320),
    strides_zyx=((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)),
    kernel_sizes_zyx=((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    blocks_per_stage=(2,) * 6, spacing_zyx_mm=(2.5, 0.78, 0.78), patch_zyx=(40, 192, 224),
    normalization="ZScoreNormalization")


@dataclass(frozen=True)
class TransferConfig:
    """How the pipeline runs; the trainer's own settings are `train` and `network`."""

    train: TrainConfig = TrainConfig()
    network: NetworkSpec = TASK3_NETWORK
    t1_sequence: str = "t1"  # the <sequence> token of the T1 images
    min_organs: int = N_ORGANS  # step 3: organs a pseudo-label must hold (published: all 13)
    min_organ_voxels: int = 20  # an organ with fewer voxels is noise, not an organ
    # Fewer than this many passing: keep the most complete ones up to this number (a relaxation for
    # demo-quality models, logged as such). 0 = the published rule only.
    min_selected: int = 0
    device: str = "auto"  # for predictions (training uses train.device)
    registration_seed: int = 0


@dataclass(frozen=True)
class MriImage:
    patient: str
    sequence: str
    path: Path

    @property
    def case_id(self) -> str:
        return f"{self.patient}_{self.sequence}"


def list_mri(mri_dir: Path) -> list[MriImage]:
    """The MRI images of MRI_DIR by the `<patient>_<sequence>_0000.nii.gz` convention; any other
    .nii.gz is an error naming the file."""
    images = []
    for path in sorted(Path(mri_dir).glob("*.nii.gz")):
        match = MRI_NAME.match(path.name)
        if match is None:
            raise CaseError(path, "not named <patient>_<sequence>_0000.nii.gz")
        images.append(MriImage(match["patient"], match["sequence"].lower(), path))
    if not images:
        raise CaseError(mri_dir, "no <patient>_<sequence>_0000.nii.gz images")
    return images


# ---- small helpers ---------------------------------------------------------------------------------

def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _link(source: Path, target: Path) -> None:
    """`target` names `source` (a symbolic link: datasets of links cost no disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(Path(source).resolve())


def organs_present(labels: np.ndarray, min_voxels: int) -> list[int]:
    """The organ labels (1..13) with at least `min_voxels` voxels."""
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=N_ORGANS + 1)
    return [label for label in range(1, N_ORGANS + 1) if counts[label] >= min_voxels]


def select_complete(organ_counts: dict[str, int], min_organs: int, min_selected: int = 0) -> list[str]:
    """Step 3's rule: the cases whose pseudo-label holds at least `min_organs` organs; when fewer than
    `min_selected` do, the `min_selected` with the most organs (ties by case id)."""
    passed = sorted(case for case, n in organ_counts.items() if n >= min_organs)
    if len(passed) >= min_selected:
        return passed
    return sorted(sorted(organ_counts, key=lambda case: (-organ_counts[case], case))[:min_selected])


def mean_scores(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Mean DSC and NSD over the organs and cases."""
    summary: dict[str, float] = {"cases": len(per_case)}
    for metric in ("dsc", "nsd"):
        values = [s[metric] for case in per_case.values() for s in case.values()]
        summary[metric] = float(np.mean(values)) if values else float("nan")
    return summary


class Quality:
    """Scores of each step's labels against truth, when truth exists; WORK/quality.json."""

    def __init__(self, work: Path, truth_dir: Path | None) -> None:
        self.path, self.truth_dir = work / "quality.json", truth_dir
        self.steps = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def truth(self, case_id: str) -> Path | None:
        if self.truth_dir is None:
            return None
        path = self.truth_dir / f"{case_id}.nii.gz"
        return path if path.is_file() else None

    def score(self, step: str, labels: dict[str, Path], note: str = "") -> None:
        if self.truth_dir is None:
            return
        per_case = {}
        for case_id, path in labels.items():
            truth = self.truth(case_id)
            if truth is not None:
                pred, gt = io.read_image(path), io.read_image(truth)
                per_case[case_id] = score_case(np.rint(pred.array_zyx).astype(np.uint8),
                                               np.rint(gt.array_zyx).astype(np.uint8),
                                               gt.geometry.spacing_zyx_mm, "organs")
        summary = mean_scores(per_case)
        self.steps[step] = {"mean": summary, "per_case": per_case}
        _write_json(self.path, self.steps)
        log.info("quality %s%s: DSC %.3f NSD %.3f over %d case(s) with truth", step, f" ({note})" if note else "",
                 summary["dsc"], summary["nsd"], summary["cases"])


# ---- predictions and registration --------------------------------------------------------------------

def predictor_for(model_dir: Path, device: str = "auto"):
    """The engine's Predictor for a model folder, features as the model was trained (torch backend)."""
    from flarebox.config import from_dict
    from flarebox.models import load_plan
    from flarebox.pipeline import Predictor

    features = load_plan(model_dir).input_features
    config = from_dict({"model": {"folder": str(model_dir)}, "preprocess": {"features": features},
                        "inference": {"backend": "torch", "device": device, "precision": "fp16"}}, model_dir)
    return Predictor.from_config(config)


def predict_images(model_dir: Path, images: dict[str, Path], out_dir: Path, device: str = "auto") -> dict[str, Path]:
    """Labels of each image (case id -> image) into out_dir/<case id>.nii.gz; existing outputs are kept
    (they were written atomically), so a rerun resumes where it stopped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {case_id: out_dir / f"{case_id}.nii.gz" for case_id in images}
    todo = [c for c in images if not outputs[c].is_file()]
    if todo:
        predictor = predictor_for(model_dir, device)
        for n, case_id in enumerate(todo, start=1):
            start = time.perf_counter()
            volume = io.read_image(images[case_id])
            io.write_labels(outputs[case_id], predictor.segment(volume), volume.geometry)
            log.info("  [%d/%d] %s: %.1fs", n, len(todo), case_id, time.perf_counter() - start)
    return outputs


def register_affine(fixed: sitk.Image, moving: sitk.Image, seed: int = 0) -> sitk.Transform:
    """The affine transform mapping fixed-image points (mm) to moving-image points that best aligns
    `moving` with `fixed`: Mattes mutual information (the sequences' intensities differ), 3 levels
    (8, 4, 2 mm smoothing, shrink 4, 2, 1), starting from the identity, since sequences of one session
    share the scanner's frame."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.AffineTransform(3)
    size, spacing = np.array(fixed.GetSize()), np.array(fixed.GetSpacing())
    initial.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([float(2 * spacing.max()), float(spacing.max()), 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def carry_labels(labels: sitk.Image, target: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Labels resampled onto `target`'s grid through `transform` (target points -> label points), nearest."""
    return sitk.Resample(labels, target, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


# ---- the steps -------------------------------------------------------------------------------------------

class Pipeline:
    def __init__(self, ct_dir: Path, mri_dir: Path, work: Path, config: TransferConfig,
                 truth_dir: Path | None = None) -> None:
        self.ct_dir, self.mri_dir, self.work, self.config = Path(ct_dir), Path(mri_dir), Path(work), config
        self.work.mkdir(parents=True, exist_ok=True)
        self.quality = Quality(self.work, Path(truth_dir) if truth_dir else None)
        self.images = list_mri(self.mri_dir)
        self.t1 = {i.patient: i for i in self.images if i.sequence == config.t1_sequence}
        if not self.t1:
            raise CaseError(mri_dir, f"no T1 images (sequence token {config.t1_sequence!r})")
        self.others = [i for i in self.images if i.sequence != config.t1_sequence and i.patient in self.t1]
        orphans = sorted({i.case_id for i in self.images if i.patient not in self.t1})
        if orphans:
            log.warning("%d image(s) without a T1 of the same patient are not used: %s", len(orphans),
                        ", ".join(orphans))
        self._check_ct()
        self.timings: dict[str, float] = {}

    def _check_ct(self) -> None:
        from flarebox_tools.training.plans import dataset_labels

        labels, _ = dataset_labels(self.ct_dir)
        if sorted(labels.values()) != list(range(N_ORGANS + 1)):
            raise ConfigError(f"{self.ct_dir}/dataset.json: expected the 13 FLARE organ labels 0..13")

    def run(self) -> Path:
        steps: list[tuple[str, Callable[[], dict]]] = [
            ("1_mind_model", self.step1_mind_model), ("2_pseudo_t1", self.step2_pseudo_t1),
            ("3_selected", self.step3_select), ("4_t1_model", self.step4_t1_model),
            ("5_carried_labels", self.step5_carry), ("6_final_model", self.step6_final_model)]
        for name, step in steps:
            marker = self.work / f"{name}.done.json"
            if marker.is_file():
                log.info("step %s: done before, skipped", name)
                continue
            log.info("step %s ...", name)
            start = time.perf_counter()
            summary = step()
            summary["seconds"] = time.perf_counter() - start
            self.timings[name] = summary["seconds"]
            _write_json(marker, summary)
            log.info("step %s: done in %.1f min", name, summary["seconds"] / 60)
        return self.work / "6_final_model"

    def _train(self, dataset: Path, model_dir: Path, spec: NetworkSpec, config: TrainConfig) -> Path:
        from flarebox_tools.training.checkpoint import strip_optimizer
        from flarebox_tools.training.trainer import train

        final = model_dir / "fold_0" / "checkpoint_final.pth"
        if final.is_file() and not (final.parent / "checkpoint_latest.pth").is_file():
            return final  # trained and stripped before an interruption kept this step from being marked done
        final = train(dataset, model_dir, config, network_spec=spec, cache_dir=self.work / "cache")
        for extra in ("checkpoint_latest.pth", "checkpoint_best.pth"):
            (final.parent / extra).unlink(missing_ok=True)
        return strip_optimizer(final)

    def step1_mind_model(self) -> dict:
        spec = dataclasses.replace(self.config.network, normalization="ZScoreNormalization", input_features="mind")
        config = replace(self.config.train, mirror_axes=(), intensity_augmentation=False)
        self._train(self.ct_dir, self.work / "1_mind_model", spec, config)
        return {"model": "1_mind_model", "training_images": len(list((self.ct_dir / "imagesTr").glob("*.nii.gz")))}

    def _t1_images(self) -> dict[str, Path]:
        return {image.case_id: image.path for image in self.t1.values()}

    def step2_pseudo_t1(self) -> dict:
        outputs = predict_images(self.work / "1_mind_model", self._t1_images(), self.work / "2_pseudo_t1",
                                 self.config.device)
        self.quality.score("2_pseudo_t1", outputs, "MIND model on T1, zero-shot")
        return {"labels": len(outputs)}

    def step3_select(self) -> dict:
        counts = {}
        for case_id in self._t1_images():
            labels = io.read_image(self.work / "2_pseudo_t1" / f"{case_id}.nii.gz").array_zyx
            counts[case_id] = len(organs_present(np.rint(labels).astype(np.uint8), self.config.min_organ_voxels))
        passed = select_complete(counts, self.config.min_organs)
        selected = select_complete(counts, self.config.min_organs, self.config.min_selected)
        relaxed = self.config.min_organs < N_ORGANS or len(selected) > len(passed)
        log.info("step 3: %d of %d T1 pseudo-labels hold >= %d of %d organs (>= %d voxels each)%s", len(passed),
                 len(counts), self.config.min_organs, N_ORGANS, self.config.min_organ_voxels,
                 "; a relaxed rule (the published one asks for all 13)" if self.config.min_organs < N_ORGANS else "")
        if len(selected) > len(passed):
            log.info("step 3: relaxed: topped up to the %d most complete (min_selected); they hold %s organs",
                     len(selected), sorted((counts[c] for c in selected), reverse=True))
        if not selected:
            best = max(counts.values())
            raise ConfigError(f"step 3: no T1 pseudo-label holds {self.config.min_organs} organs (the best holds "
                              f"{best}); lower --min-organs or train the MIND model longer")
        summary = {"rule": {"min_organs": self.config.min_organs, "min_organ_voxels": self.config.min_organ_voxels,
                            "min_selected": self.config.min_selected, "relaxed": relaxed},
                   "organ_counts": counts, "selected": selected, "passed": len(passed), "kept": len(selected),
                   "of": len(counts)}
        _write_json(self.work / "3_selected.json", summary)
        pseudo = {c: self.work / "2_pseudo_t1" / f"{c}.nii.gz" for c in counts}
        self.quality.score("3_selected", {c: pseudo[c] for c in selected}, "pseudo-labels that passed")
        self.quality.score("3_rejected", {c: pseudo[c] for c in counts if c not in selected}, "those that did not")
        return summary

    def _dataset(self, folder: Path, cases: dict[str, tuple[Path, Path]], name: str) -> Path:
        """An nnU-Net raw dataset of links: case id -> (image, labels)."""
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for case_id, (image, labels) in cases.items():
            _link(image, folder / "imagesTr" / f"{case_id}{io.INPUT_SUFFIX}")
            _link(labels, folder / "labelsTr" / f"{case_id}.nii.gz")
        _write_json(folder / "dataset.json", {"channel_names": {"0": "MRI"}, "labels": ORGAN_LABELS,
                                              "numTraining": len(cases), "file_ending": ".nii.gz", "name": name})
        return folder

    def _intensity_spec(self) -> NetworkSpec:
        return dataclasses.replace(self.config.network, normalization="ZScoreNormalization",
                                   input_features="intensity")

    def step4_t1_model(self) -> dict:
        selected = json.loads((self.work / "3_selected.json").read_text())["selected"]
        images = self._t1_images()
        dataset = self._dataset(self.work / "4_t1_dataset",
                                {c: (images[c], self.work / "2_pseudo_t1" / f"{c}.nii.gz") for c in selected},
                                "T1 with MIND pseudo-labels")
        self._train(dataset, self.work / "4_t1_model", self._intensity_spec(), self.config.train)
        rest = {c: p for c, p in images.items() if c not in selected}
        predicted = predict_images(self.work / "4_t1_model", rest, self.work / "4_t1_predicted", self.config.device)
        labels_dir = self.work / "4_t1_labels"
        for case_id in images:
            source = self.work / "2_pseudo_t1" / f"{case_id}.nii.gz" if case_id in selected else predicted[case_id]
            _link(source, labels_dir / f"{case_id}.nii.gz")
        self.quality.score("4_t1_predicted", predicted, "T1 model on the T1s not selected")
        self.quality.score("4_t1_labels", {c: labels_dir / f"{c}.nii.gz" for c in images}, "every T1's labels")
        return {"model": "4_t1_model", "trained_on": len(selected), "labelled_by_t1_model": len(rest)}

    def step5_carry(self) -> dict:
        out_dir = self.work / "5_carried_labels"
        out_dir.mkdir(parents=True, exist_ok=True)
        carried, unregistered = {}, {}
        for image in self.others:
            target = out_dir / f"{image.case_id}.nii.gz"
            carried[image.case_id] = target
            if target.is_file():
                continue
            t1 = self.t1[image.patient]
            start = time.perf_counter()
            fixed, moving = sitk.ReadImage(str(image.path)), sitk.ReadImage(str(t1.path))
            transform = register_affine(fixed, moving, self.config.registration_seed)
            labels = sitk.ReadImage(str(self.work / "4_t1_labels" / f"{t1.case_id}.nii.gz"), sitk.sitkUInt8)
            sitk.WriteTransform(transform, str(out_dir / f"{image.case_id}_from_{t1.sequence}.tfm"))
            tmp = out_dir / f".{image.case_id}.{os.getpid()}.nii.gz"
            sitk.WriteImage(carry_labels(labels, fixed, transform), str(tmp), True)
            os.replace(tmp, target)
            log.info("  %s <- %s: registered in %.1fs", image.case_id, t1.case_id, time.perf_counter() - start)
            if self.quality.truth_dir is not None:  # what registration gained over the scanner's frame alone
                plain = out_dir / "identity" / f"{image.case_id}.nii.gz"
                plain.parent.mkdir(exist_ok=True)
                sitk.WriteImage(carry_labels(labels, fixed, sitk.Transform()), str(plain), True)
                unregistered[image.case_id] = plain
        self.quality.score("5_carried_labels", carried, "registered")
        if unregistered:
            self.quality.score("5_carried_without_registration", unregistered, "identity transform, for comparison")
        return {"carried": len(carried)}

    def step6_final_model(self) -> dict:
        from flarebox_tools.training.data import list_cases

        cases = {}
        for raw in list_cases(self.ct_dir):
            cases[f"ct_{raw.case_id}"] = (raw.image_path, raw.label_path)
        for case_id, image in self._t1_images().items():
            cases[f"mri_{case_id}"] = (image, self.work / "4_t1_labels" / f"{case_id}.nii.gz")
        for image in self.others:
            cases[f"mri_{image.case_id}"] = (image.path, self.work / "5_carried_labels" / f"{image.case_id}.nii.gz")
        dataset = self._dataset(self.work / "6_final_dataset", cases, "MRI (pseudo-labels) + CT")
        self._train(dataset, self.work / "6_final_model", self._intensity_spec(), self.config.train)
        n_mri = sum(c.startswith("mri_") for c in cases)
        return {"model": "6_final_model", "mri_images": n_mri, "ct_images": len(cases) - n_mri}


def run(ct_dir: Path, mri_dir: Path, work: Path, config: TransferConfig, truth_dir: Path | None = None) -> Path:
    """All six steps (those not done before); returns the final model folder."""
    return Pipeline(ct_dir, mri_dir, work, config, truth_dir).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flarebox-tools transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--ct", required=True, help="labelled CT, nnU-Net raw layout (imagesTr, labelsTr)")
    parser.add_argument("--mri", required=True, help="unlabelled MRI: <patient>_<sequence>_0000.nii.gz")
    parser.add_argument("--work", required=True, help="where every step's output goes (rerun to resume)")
    parser.add_argument("--config", help="TOML with [train] and [network] (default network: TASK3_NETWORK)")
    parser.add_argument("--minutes", type=float, help="time limit of each of the three trainings")
    parser.add_argument("--t1-sequence", default="t1", help="the <sequence> token of T1 images (default t1)")
    parser.add_argument("--min-organs", type=int, default=N_ORGANS, help="step 3: organs a pseudo-label must hold")
    parser.add_argument("--min-organ-voxels", type=int, default=20, help="voxels an organ needs to count")
    parser.add_argument("--min-selected", type=int, default=0,
                        help="fewer pass: keep this many most complete ones (a relaxation; default 0: none)")
    parser.add_argument("--device", default="auto", help="device for predictions: auto, cpu or cuda")
    parser.add_argument("--mri-labels", help="truth for the MRI (<patient>_<sequence>.nii.gz), only to log quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from flarebox_tools.training.config import load_config

    try:
        train, network = load_config(args.config, time_limit_minutes=args.minutes)
        config = TransferConfig(train=train, network=network or TASK3_NETWORK, t1_sequence=args.t1_sequence.lower(),
                                min_organs=args.min_organs, min_organ_voxels=args.min_organ_voxels,
                                min_selected=args.min_selected, device=args.device)
        if not 1 <= config.min_organs <= N_ORGANS:
            raise ConfigError(f"--min-organs: must be in 1..{N_ORGANS}, got {config.min_organs}")
        final = run(Path(args.ct), Path(args.mri), Path(args.work), config,
                    Path(args.mri_labels) if args.mri_labels else None)
    except (ConfigError, CaseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("final model: %s", final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
