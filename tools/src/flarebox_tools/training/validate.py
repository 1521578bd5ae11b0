"""Validation during training: the engine's own sliding window on held-out preprocessed cases,
scored with the FLARE metrics (DSC and NSD per class) on the plan's grid.

The arrays are the cached, preprocessed cases, so no resampling back to the original grid happens
here: scores are at the model's spacing (slightly kinder to thin structures than the organisers'
scoring at the original spacing, which `flarebox_tools.training.demo` does on raw held-out images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flarebox.backends.torch_runtime import TorchBackend
from flarebox.models import ModelPlan
from flarebox.sliding_window import predict_logits
from flarebox_tools.metrics import score_case, score_class
from flarebox_tools.training.checkpoint import unwrap
from flarebox_tools.training.data import TrainingCase

GENERIC_TOLERANCE_MM = 2.0  # NSD tolerance for labels that are neither the FLARE organs nor a lesion


@dataclass(frozen=True)
class ValidationScores:
    per_class: dict[str, dict[str, float]]  # class name -> mean {"dsc", "nsd"} over the cases
    per_case: dict[str, dict[str, dict[str, float]]]

    @property
    def mean_dsc(self) -> float:
        return float(np.nanmean([s["dsc"] for s in self.per_class.values()]))

    @property
    def mean_nsd(self) -> float:
        return float(np.nanmean([s["nsd"] for s in self.per_class.values()]))


def score_labels(pred: np.ndarray, gt: np.ndarray, spacing_zyx_mm: tuple[float, float, float],
                 labels: dict[str, int]) -> dict[str, dict[str, float]]:
    """FLARE scoring when the label set is FLARE's (13 organs, or binary lesion); otherwise DSC and
    NSD at 2 mm per label with the same empty-mask rules."""
    values = sorted(v for v in labels.values() if v != 0)
    if values == list(range(1, 14)):
        return score_case(pred, gt, spacing_zyx_mm, "organs")
    if values == [1]:
        return score_case(pred, gt, spacing_zyx_mm, "lesion")
    names = {v: k for k, v in labels.items()}
    return {names[v]: score_class(pred == v, gt == v, spacing_zyx_mm, GENERIC_TOLERANCE_MM) for v in values}


def validate(network: torch.nn.Module, cases: list[TrainingCase], plan: ModelPlan, device: str | torch.device,
             *, step_size: float = 0.5) -> ValidationScores:
    """Sliding-window prediction (deep supervision off, eval mode) and FLARE scores of each case."""
    module = unwrap(network)
    was_training = module.training
    deep = getattr(module.decoder, "deep_supervision", False)
    module.decoder.deep_supervision = False
    module.eval()
    try:
        backend = TorchBackend([module], plan.patch_zyx, plan.num_classes, device=str(device), z_halo=plan.z_halo)
        per_case = {}
        for case in cases:
            logits = predict_logits(np.asarray(case.image), backend, step_size=step_size)
            pred = logits.argmax(0).astype(np.uint8)
            per_case[case.case_id] = score_labels(pred, np.asarray(case.labels), plan.spacing_zyx_mm, plan.labels)
    finally:
        module.decoder.deep_supervision = deep
        module.train(was_training)
    names = next(iter(per_case.values())).keys() if per_case else []
    per_class = {n: {m: float(np.nanmean([s[n][m] for s in per_case.values()])) for m in ("dsc", "nsd")} for n in names}
    return ValidationScores(per_class, per_case)
