"""GPU path of the torch backend (tasks 1 and 3): fp16 autocast on CUDA against f32 on the CPU, and
peak VRAM of the published networks' patches. Skipped where no CUDA device exists (CI has none);
run on a GPU machine with `pytest -q -s tests/test_gpu.py`."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_fp16_matches_cpu_f32(tiny_torch_model_dir):
    from flarebox import io
    from flarebox.backends import load_backend
    from flarebox.models import load_plan
    from flarebox.preprocess import preprocess
    from flarebox.sliding_window import predict_logits
    from tests.conftest import REAL_CT

    tiny_plan = load_plan(tiny_torch_model_dir)
    volume = io.read_image(REAL_CT)
    data = preprocess(volume.array_zyx, volume.geometry.spacing_zyx_mm, tiny_plan).data
    cpu = predict_logits(data, load_backend(tiny_plan, backend="torch", device="cpu"))
    gpu = predict_logits(data, load_backend(tiny_plan, backend="torch", device="cuda", precision="fp16"))
    worst = np.abs(cpu - gpu).max() / np.abs(cpu).max()
    agreement = np.mean(cpu.argmax(0) == gpu.argmax(0))
    print(f"\nCUDA fp16 vs CPU f32: max |diff| {100 * worst:.3f}% of max |logit|, labels agree {100 * agreement:.3f}%")
    assert worst <= 0.01 and agreement >= 0.995


@pytest.mark.parametrize("preset", ["FLARE_TASK2_PLAIN", "FLARE_TASK3_PLAIN", "FLARE_TASK1_RESENC"])
def test_published_network_patch_fits_in_4_gb_fp16(tmp_path, preset):
    from flarebox.backends import load_backend
    from flarebox.models import load_plan
    from flarebox_tools import nnunet_folders

    if not hasattr(nnunet_folders, preset):
        pytest.skip(f"no preset {preset}")
    folder = nnunet_folders.make_trained_model_folder(tmp_path / preset, **getattr(nnunet_folders, preset))
    plan = load_plan(folder)
    torch.cuda.reset_peak_memory_stats()
    backend = load_backend(plan, backend="torch", device="cuda", precision="fp16")
    tile = np.random.default_rng(0).normal(size=(1, 1, *plan.patch_zyx)).astype(np.float32)
    backend.predict(tile)
    torch.cuda.synchronize()
    peak_gb = torch.cuda.max_memory_allocated() / 1024**3
    params = sum(p.numel() for p in backend.networks[0].parameters()) / 1e6
    print(f"\n{preset}: {params:.2f} M parameters, patch {plan.patch_zyx}, peak allocated {peak_gb:.2f} GB (fp16)")
    assert peak_gb < 4.0


def test_logits_summed_on_the_gpu_equal_host_sums_and_budget_decides(tiny_torch_model_dir):
    from flarebox import io
    from flarebox.backends import load_backend
    from flarebox.models import load_plan
    from flarebox.preprocess import preprocess
    from flarebox.sliding_window import predict_logits
    from tests.conftest import REAL_CT

    plan = load_plan(tiny_torch_model_dir)
    volume = io.read_image(REAL_CT)
    data = preprocess(volume.array_zyx, volume.geometry.spacing_zyx_mm, plan).data
    backend = load_backend(plan, backend="torch", device="cuda", precision="fp16")
    backend.reset_peak()
    host = predict_logits(data, backend)
    host_peak = backend.peak_bytes()
    backend.reset_peak()
    device = predict_logits(data, backend, accumulate="device")
    np.testing.assert_allclose(device, host, rtol=1e-4, atol=1e-4)  # same fp16 tiles, float32 sums either way
    band_bytes = 4 * plan.patch_zyx[0] * int(np.prod(data.shape[2:]))
    assert backend.peak_bytes() >= host_peak + (plan.num_classes + 1) * band_bytes  # the band lived on the GPU
    assert backend.accumulation_place(data.shape[1:], 2**34) == "device"
    assert backend.accumulation_place(data.shape[1:], backend.tile_peak_bytes()) == "host"


def test_task1_case_within_budget_reports_peak(tmp_path):
    """A Task 1-sized case through the Predictor: the progress notes carry the peak GPU memory, and
    it stays within the configured budget."""
    from flarebox import io
    from flarebox.config import from_dict
    from flarebox.pipeline import Predictor, Timings
    from flarebox_tools import nnunet_folders
    from flarebox_tools.synthetic import ct_like, write_image

    model = nnunet_folders.make_trained_model_folder(tmp_path / "t1", **nnunet_folders.FLARE_TASK1_RESENC)
    predictor = Predictor.from_config(from_dict(
        {"model": {"folder": str(model)},
         "inference": {"backend": "torch", "device": "cuda", "precision": "fp16", "gpu_memory_gb": 3.5}}, tmp_path))
    path = write_image(tmp_path / "big_0000.nii.gz", ct_like((300, 400, 400)), spacing_xyz=(0.8, 0.8, 1.0))
    timings = Timings()
    labels = predictor.segment(io.read_image(path), timings)
    print(f"\nTask 1 ResEnc, 300x400x400: {timings.line()}")
    assert set(np.unique(labels)) <= {0, 1}
    assert float(timings.notes["gpu_peak"].removesuffix("GB")) <= 3.5
