"""backends: OpenVINO against torch on the same weights and the same real-CT tiles."""

from __future__ import annotations

import numpy as np
import pytest

from flarebox import io
from flarebox.backends import load_backend
from flarebox.errors import ConfigError
from flarebox.preprocess import preprocess
from flarebox.sliding_window import predict_logits
from tests.conftest import REAL_CT


@pytest.fixture(scope="module")
def real_ct_preprocessed(tiny_plan):
    volume = io.read_image(REAL_CT)[1]
    return preprocess(volume.array_zyx, volume.geometry.spacing_zyx_mm, tiny_plan).data


@pytest.fixture(scope="module")
def torch_logits(tiny_plan, real_ct_preprocessed):
    return predict_logits(real_ct_preprocessed, load_backend(tiny_plan, backend="torch"))


def test_openvino_f32_matches_torch_within_1e3(tiny_plan, real_ct_preprocessed, torch_logits):
    ov_logits = predict_logits(real_ct_preprocessed, load_backend(tiny_plan, backend="openvino", precision="f32"))
    assert ov_logits.shape == torch_logits.shape
    # float32 rounding through the network grows with the logits' scale (|logit| reaches ~23 here):
    # the bound is 1e-3 of the largest |logit|, the absolute figure is printed
    diff, scale = float(np.abs(ov_logits - torch_logits).max()), float(np.abs(torch_logits).max())
    print(f"\nOpenVINO f32 vs torch: max |diff| {diff:.2e}, max |logit| {scale:.1f}, relative {diff / scale:.1e}")
    assert diff <= 1e-3 * scale


@pytest.mark.parametrize(("precision", "min_agreement"), [("bf16", 0.95), ("int8", 0.80)])
def test_reduced_precision_label_agreement(tiny_plan, real_ct_preprocessed, torch_logits, precision,
                                           min_agreement, record_property):
    logits = predict_logits(real_ct_preprocessed, load_backend(tiny_plan, backend="openvino", precision=precision))
    agreement = float(np.mean(logits.argmax(0) == torch_logits.argmax(0)))
    record_property(f"{precision}_label_agreement", agreement)
    print(f"\nOpenVINO {precision} vs torch f32 labels agree on {100 * agreement:.2f}% of voxels (random weights)")
    assert agreement >= min_agreement


def test_torch_ensemble_averages_folds(tiny_plan, real_ct_preprocessed):
    single = load_backend(tiny_plan, backend="torch", folds=(0,))
    from flarebox.sliding_window import pad_to_patch

    padded, _ = pad_to_patch(real_ct_preprocessed, tiny_plan.patch_zyx)
    tile = np.ascontiguousarray(padded[None, :, *(slice(0, p) for p in tiny_plan.patch_zyx)])
    twice = load_backend(tiny_plan, backend="torch", folds=(0, 0))
    np.testing.assert_allclose(twice.predict(tile), single.predict(tile), rtol=1e-5, atol=1e-5)


def test_missing_or_stale_ir_is_refused(tiny_plan, tmp_path):
    import dataclasses
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_plan.folder, copy)
    plan = dataclasses.replace(tiny_plan, folder=copy)
    (copy / "openvino" / "fold_0_int8.bin").write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="sha256"):
        load_backend(plan, precision="int8")
    with pytest.raises(ConfigError, match="missing"):
        load_backend(plan, folds=(3,))
    with pytest.raises(ConfigError, match="precision"):
        load_backend(plan, precision="fp16")
