"""Training data: an nnU-Net raw dataset put through the engine's own preprocessing, cached as .npy.

In: DATASET/imagesTr/<case>_0000.nii.gz with DATASET/labelsTr/<case>.nii.gz, and a ModelPlan.
Out: per case a (c, z, y, x) float32 image and a (z, y, x) uint8 label map on the plan's grid,
memory-mapped from CACHE/<key>/<case>_image.npy and <case>_labels.npy, and up to 10,000 voxel
positions per foreground class (<case>_locations.npz) to centre foreground patches on.

The image goes through `flarebox.preprocess.preprocess`, the very function inference uses
(transpose, crop to nonzero, normalise, resample), so training sees what inference will feed the
network. Labels follow the same transpose and crop and are resampled the way nnU-Net resamples
segmentations: every label's mask linearly, then each voxel takes the label with the highest value
(nearest neighbour would thin or break small structures when downsampling). The cache key hashes
everything preprocessing depends on; a case is redone when its source files are newer than its cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flarebox import io
from flarebox.errors import CaseError
from flarebox.models import ModelPlan
from flarebox.preprocess import preprocess
from flarebox.resample import resize_linear

LOCATIONS_PER_CLASS = 10_000  # as nnU-Net stores them: plenty to centre patches on, cheap to keep
CACHE_VERSION = 1  # bump when the cached format or the label resampling changes


@dataclass(frozen=True)
class RawCase:
    case_id: str
    image_path: Path
    label_path: Path


@dataclass(frozen=True)
class TrainingCase:
    """One preprocessed case; arrays are read-only memory maps of the cache."""

    case_id: str
    image: np.ndarray  # (c, z, y, x) float32, on the plan's grid and in its transposed axes
    labels: np.ndarray  # (z, y, x) uint8, same grid
    class_locations: dict[int, np.ndarray]  # label -> (n, 3) int32 voxel indices (z, y, x)


def list_cases(dataset_dir: str | Path) -> list[RawCase]:
    """Cases of an nnU-Net raw dataset that have both an image and labels, sorted by id."""
    dataset_dir = Path(dataset_dir)
    cases = []
    for image in sorted((dataset_dir / "imagesTr").glob(f"*{io.INPUT_SUFFIX}")):
        case_id = image.name[: -len(io.INPUT_SUFFIX)]
        label = dataset_dir / "labelsTr" / f"{case_id}.nii.gz"
        if label.is_file():
            cases.append(RawCase(case_id, image, label))
    if not cases:
        raise CaseError(dataset_dir, "no imagesTr/<case>_0000.nii.gz with a labelsTr/<case>.nii.gz")
    return cases


def cache_key(plan: ModelPlan) -> str:
    """A short hash of everything preprocessing depends on."""
    fields = {
        "version": CACHE_VERSION,
        "spacing_zyx_mm": plan.spacing_zyx_mm,
        "transpose_forward": plan.transpose_forward,
        "normalizations": [vars(n) for n in plan.normalizations],
        "use_mask_for_norm": plan.use_mask_for_norm,
    }
    if plan.input_features == "mind":  # only then, so the keys of existing intensity caches stay valid
        from flarebox.mind import DEFAULT_DILATION_MM, DEFAULT_SIGMA_MM

        fields["mind_dilation_sigma_mm"] = (DEFAULT_DILATION_MM, DEFAULT_SIGMA_MM)
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resample_labels(labels_zyx: np.ndarray, shape_zyx: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's segmentation resampling: each label's mask linearly, the highest value wins."""
    if tuple(labels_zyx.shape) == tuple(shape_zyx):
        return labels_zyx.astype(np.uint8)
    out = np.zeros(shape_zyx, np.uint8)
    best = resize_linear((labels_zyx == 0).astype(np.float32), shape_zyx)
    for label in np.unique(labels_zyx):
        if label == 0:
            continue
        value = resize_linear((labels_zyx == label).astype(np.float32), shape_zyx)
        wins = value >= best  # a tie goes to the structure, as nnU-Net's `>= 0.5` gives it
        out[wins] = label
        best[wins] = value[wins]
    return out


def preprocess_case(case: RawCase, plan: ModelPlan) -> tuple[np.ndarray, np.ndarray]:
    """(c, z, y, x) float32 image and (z, y, x) uint8 labels on the plan's grid."""
    volume = io.read_image(case.image_path)
    labels = io.read_image(case.label_path).array_zyx
    if labels.shape != volume.array_zyx.shape:
        raise CaseError(case.label_path, f"labels {labels.shape} and image {volume.array_zyx.shape} differ in shape")
    if labels.min() < 0 or labels.max() > 255 or not np.array_equal(labels, np.round(labels)):
        raise CaseError(case.label_path, "labels must be integers in [0, 255]")
    pre = preprocess(volume.array_zyx, volume.geometry.spacing_zyx_mm, plan, resampler="torch")
    labels = np.transpose(labels, plan.transpose_forward)[tuple(slice(a, b) for a, b in pre.bbox)]
    return pre.data, resample_labels(labels.astype(np.uint8), pre.data.shape[1:])


def class_locations(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Up to LOCATIONS_PER_CLASS random voxel indices of every foreground label."""
    out = {}
    for label in np.unique(labels):
        if label == 0:
            continue
        coords = np.argwhere(labels == label).astype(np.int32)
        if len(coords) > LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), LOCATIONS_PER_CLASS, replace=False)]
        out[int(label)] = coords
    return out


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def _cached_paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    return folder / f"{case_id}_image.npy", folder / f"{case_id}_labels.npy", folder / f"{case_id}_locations.npz"


def _is_fresh(case: RawCase, paths: tuple[Path, ...]) -> bool:
    if not all(p.is_file() for p in paths):
        return False
    newest_source = max(case.image_path.stat().st_mtime, case.label_path.stat().st_mtime)
    return min(p.stat().st_mtime for p in paths) >= newest_source


def cache_folder(cache_dir: str | Path, plan: ModelPlan) -> Path:
    return Path(cache_dir) / cache_key(plan)


def prepare_cache(cases: list[RawCase], plan: ModelPlan, cache_dir: str | Path) -> Path:
    """Preprocess every case not cached yet (or older than its sources); returns the cache folder.
    Safe to run in several processes on disjoint case lists: every file is written atomically."""
    folder = cache_folder(cache_dir, plan)
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        image_path, labels_path, locations_path = paths = _cached_paths(folder, case.case_id)
        if _is_fresh(case, paths):
            continue
        image, labels = preprocess_case(case, plan)
        seed = int.from_bytes(hashlib.sha1(case.case_id.encode()).digest()[:4], "little")
        locations = class_locations(labels, np.random.default_rng(seed))
        _save_atomic(image_path, image)
        _save_atomic(labels_path, labels)
        tmp = locations_path.with_name(f".{locations_path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{str(k): v for k, v in locations.items()})
        os.replace(tmp, locations_path)
    return folder


def load_cached(case_ids: list[str], folder: Path) -> list[TrainingCase]:
    """Memory-map cached cases (prepare_cache first)."""
    out = []
    for case_id in case_ids:
        image_path, labels_path, locations_path = _cached_paths(folder, case_id)
        with np.load(locations_path) as npz:
            locations = {int(k): npz[k] for k in npz.files}
        out.append(TrainingCase(case_id, np.load(image_path, mmap_mode="r"), np.load(labels_path, mmap_mode="r"),
                                locations))
    return out


def split_cases(case_ids: list[str], n_validation: int, fold: int, seed: int = 12345) -> tuple[list[str], list[str]]:
    """(training, validation) ids: fold k holds out the k-th block of n_validation cases of a fixed
    shuffle, so folds 0, 1, ... are disjoint cross-validation splits. At least one case stays for training."""
    n_validation = min(n_validation, len(case_ids) - 1)
    if n_validation <= 0:
        return list(case_ids), []
    order = [case_ids[i] for i in np.random.default_rng(seed).permutation(len(case_ids))]
    start = (fold * n_validation) % len(order)
    held = set((order + order)[start:start + n_validation])
    return [c for c in case_ids if c not in held], [c for c in case_ids if c in held]
