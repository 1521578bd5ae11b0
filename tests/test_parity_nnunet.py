"""Parity with nnU-Net v2 itself: same weights, same preprocessed real CT, nnU-Net's own sliding
window (run in its own environment, .venv-nnunet) against ours.

Stock nnU-Net accumulates in float16 on the CPU: against it, logits must agree within 1 % of the
largest |logit| and labels on at least 99.5 % of voxels. With nnU-Net's accumulator switched to
float32 (its tile placement, Gaussian map and padding unchanged), ours must equal it to float32
rounding: that isolates every remaining difference to nnU-Net's half-precision accumulation.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flarebox import io
from flarebox.backends import load_backend
from flarebox.models import load_plan
from flarebox.preprocess import preprocess
from flarebox.sliding_window import predict_logits
from flarebox_tools import nnunet_folders
from tests.conftest import REAL_CT

ROOT = Path(__file__).resolve().parents[1]
NNUNET_PYTHON = ROOT / ".venv-nnunet" / "bin" / "python"

if not NNUNET_PYTHON.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{NNUNET_PYTHON} missing: `make nnunet-env` must run before the tests in CI")
    pytest.skip("nnU-Net reference environment missing (make nnunet-env)", allow_module_level=True)


def nnunet_logits(model: Path, data: np.ndarray, tmp_path: Path, step: float, float32: bool = False) -> np.ndarray:
    np.save(tmp_path / "pre.npy", data)
    cmd = [str(NNUNET_PYTHON), str(ROOT / "tests" / "reference" / "nnunet_logits.py"), "--model-dir", str(model),
           "--input", str(tmp_path / "pre.npy"), "--output", str(tmp_path / "ref.npy"), "--step", str(step)]
    subprocess.run(cmd + (["--float32-accumulation"] if float32 else []), check=True, timeout=600)
    return np.load(tmp_path / "ref.npy")


def ours_and_input(tmp_path: Path, preset: str, step: float) -> tuple[Path, np.ndarray, np.ndarray]:
    model = nnunet_folders.make_trained_model_folder(tmp_path / "model", seed=3, **getattr(nnunet_folders, preset))
    plan = load_plan(model)
    volume = io.read_image(REAL_CT)
    data = preprocess(volume.array_zyx, volume.geometry.spacing_zyx_mm, plan).data
    return model, data, predict_logits(data, load_backend(plan, backend="torch"), step_size=step)


@pytest.mark.parametrize(("preset", "step"), [("TINY_PLAIN", 0.5), ("TINY_RESENC", 0.5), ("TINY_PLAIN", 0.7)])
def test_tiling_equals_nnunet_with_float32_accumulation(tmp_path, preset, step):
    """Small patches on the real CT: hundreds of overlapping tiles, padding and border blending."""
    model, data, ours = ours_and_input(tmp_path, preset, step)
    reference = nnunet_logits(model, data, tmp_path, step, float32=True)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    assert np.array_equal(ours.argmax(0), reference.argmax(0))


@pytest.mark.parametrize(("preset", "step"), [("FLARE_TASK2_PLAIN", 0.5), ("TINY_PLAIN", 0.5), ("TINY_RESENC", 0.5)])
def test_logits_and_labels_match_stock_nnunet(tmp_path, preset, step, record_property):
    model, data, ours = ours_and_input(tmp_path, preset, step)
    reference = nnunet_logits(model, data, tmp_path, step)
    assert ours.shape == reference.shape
    worst = float(np.abs(ours - reference).max() / np.abs(reference).max())
    agreement = float(np.mean(ours.argmax(0) == reference.argmax(0)))
    record_property("max_abs_diff_fraction", worst)
    record_property("label_agreement", agreement)
    print(f"\n{preset} step {step}: max |ours - nnU-Net| = {100 * worst:.4f}% of max |logit|, "
          f"labels agree on {100 * agreement:.3f}% of {ours[0].size} voxels")
    if preset.startswith("FLARE"):
        assert worst <= 0.01
    # Tiny networks tile the CT into hundreds of patches whose corners reach the image corners, where
    # nnU-Net's float16 accumulator underflows (up to 8 % of the largest logit there, measured); the
    # float32 test above shows that is all of the difference. Their labels must still agree.
    assert agreement >= 0.995
