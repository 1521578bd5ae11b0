"""Training data: an nnU-Net raw dataset preprocessed by the engine's own `preprocess`, cached.

Labels follow the image through the same transpose and crop and are resized by nearest neighbour
to the preprocessed grid, so the network trains on exactly what inference will feed it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from flarebox import io
from flarebox.models import ModelPlan
from flarebox.preprocess import preprocess
from flarebox.resample import resize_nearest


@dataclass(frozen=True)
class Sample:
    case_id: str
    image: np.ndarray  # (c, z, y, x) float32, preprocessed
    labels: np.ndarray  # (z, y, x) uint8 on the same grid


def list_cases(dataset_dir: Path) -> list[tuple[str, Path, Path]]:
    images = sorted((dataset_dir / "imagesTr").glob(f"*{io.INPUT_SUFFIX}"))
    cases = []
    for image in images:
        case_id = image.name[: -len(io.INPUT_SUFFIX)]
        label = dataset_dir / "labelsTr" / f"{case_id}.nii.gz"
        if label.exists():
            cases.append((case_id, image, label))
    if not cases:
        raise FileNotFoundError(f"{dataset_dir}: no imagesTr/<case>_0000.nii.gz with labelsTr/<case>.nii.gz")
    return cases


def preprocess_case(image_path: Path, label_path: Path, plan: ModelPlan) -> tuple[np.ndarray, np.ndarray]:
    volume = io.read_image(image_path)[1]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).astype(np.uint8)
    pre = preprocess(volume.array_zyx, volume.geometry.spacing_zyx_mm, plan)
    labels = np.transpose(labels, plan.transpose_forward)[tuple(slice(a, b) for a, b in pre.bbox)]
    return pre.data, np.ascontiguousarray(resize_nearest(labels, pre.data.shape[1:]))


def load_dataset(dataset_dir: str | Path, plan: ModelPlan, cache_dir: str | Path) -> list[Sample]:
    """Every case of the dataset, preprocessed once and cached as .npz in cache_dir."""
    dataset_dir, cache_dir = Path(dataset_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = cache_dir / "plan.json"
    key = json.dumps({"spacing": plan.spacing_zyx_mm, "norm": [n.__dict__ for n in plan.normalizations]})
    if not stamp.exists() or stamp.read_text() != key:
        for old in cache_dir.glob("*.npz"):
            old.unlink()
        stamp.write_text(key)
    samples = []
    for case_id, image_path, label_path in list_cases(dataset_dir):
        cached = cache_dir / f"{case_id}.npz"
        if not cached.exists():
            image, labels = preprocess_case(image_path, label_path, plan)
            np.savez(cached, image=image, labels=labels)
        with np.load(cached) as npz:
            samples.append(Sample(case_id, npz["image"], npz["labels"]))
    return samples
