"""memory: the limit (cgroup v2, v1, none), the header's estimate against a measured peak, refusals
and read-ahead within the budget in run_folder."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest

from flarebox import io, memory, pipeline
from flarebox.config import from_dict, load_config
from flarebox.memory import Budget
from flarebox.pipeline import Predictor, run_folder
from flarebox_tools.bench.memory import measure
from flarebox_tools.synthetic import ct_like, oblique, write_image

ROOT = Path(__file__).resolve().parents[1]


def test_cgroup_limit_v2_v1_and_none(tmp_path):
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("2147483648\n")
    assert memory.cgroup_limit_bytes((str(v2), str(v1))) == 2**31
    v2.write_text("max\n")
    assert memory.cgroup_limit_bytes((str(v2), str(v1))) is None
    v1.write_text("9223372036854771712\n")  # cgroup v1 without a limit
    assert memory.cgroup_limit_bytes((str(tmp_path / "absent"), str(v1))) is None
    v1.write_text("1073741824\n")
    assert memory.cgroup_limit_bytes((str(tmp_path / "absent"), str(v1))) == 2**30
    assert memory.cgroup_limit_bytes((str(tmp_path / "absent"),)) is None


def test_limit_prefers_the_configuration_then_the_container():
    assert memory.limit_bytes(1.5) == (int(1.5 * 2**30), "configured")
    limit, source = memory.limit_bytes(0.0)
    assert source in ("container limit", "machine memory") and 0 < limit <= memory.machine_bytes()


@pytest.mark.parametrize("kind", ["plain", "oblique", "float", "sheared"])
def test_header_tells_the_grid_that_reading_finds(tmp_path, kind):
    path = tmp_path / "case_0000.nii.gz"
    if kind == "sheared":
        import nibabel

        affine = np.array([[0.8, 0.3, 0, 5], [0, 0.9, 0, -3], [0, 0, 2.5, 1], [0, 0, 0, 1]])
        image = nibabel.Nifti1Image(ct_like((11, 23, 19)).transpose(2, 1, 0), affine)
        image.set_qform(np.diag([0.8, 0.9, 2.5, 1]), code=1)
        image.set_sform(affine, code=2)
        nibabel.save(image, path)
    else:
        array = ct_like((11, 23, 19)).astype(np.float32 if kind == "float" else np.int16)
        write_image(path, array, spacing_xyz=(0.8, 0.9, 2.5),
                    direction=oblique() if kind == "oblique" else (1, 0, 0, 0, 1, 0, 0, 0, 1))
    header, volume = io.read_header(path), io.read_image(path)
    assert header.shape_zyx == volume.array_zyx.shape
    np.testing.assert_allclose(header.spacing_zyx_mm, volume.geometry.spacing_zyx_mm, rtol=1e-5)
    assert header.read_itemsize >= volume.array_zyx.itemsize


def test_header_of_a_4d_file_leaves_the_verdict_to_reading(tmp_path):
    import nibabel

    path = tmp_path / "four_0000.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), path)
    assert io.read_header(path) is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_the_estimate_bounds_the_measured_peak_of_a_real_case(tmp_path):
    """Task 2's shipped configuration and model on a 512 x 512 x 80 CT, in a fresh process: the peak
    resident memory rises by less than the header's estimate (and not by ten times less)."""
    warm, cases = tmp_path / "warm", tmp_path / "cases"
    warm.mkdir()
    cases.mkdir()
    write_image(warm / "w_0000.nii.gz", ct_like((20, 48, 40)), spacing_xyz=(2, 2, 3))
    image = np.broadcast_to(ct_like((80, 128, 128), seed=2)[:, :, None, :, None], (80, 128, 4, 128, 4))
    write_image(cases / "big_0000.nii.gz", image.reshape(80, 512, 512), spacing_xyz=(0.8, 0.8, 2.5))
    result = measure(ROOT / "task2_cpu_organs" / "config.toml", warm, cases, tmp_path / "out")
    assert result["failures"] == 0
    result["need"] = result["read"] + result["work"]
    result["rise"] = result["peak"] - result["before"]
    assert result["need"] / 10 < result["rise"] <= result["need"], result


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return from_dict({"model": {"folder": str(tiny_model_dir)}, "inference": {"precision": "f32"}}, Path.cwd())


def test_a_case_that_cannot_fit_is_refused_in_one_line_and_the_others_written(config, tmp_path, caplog):
    """100 voxels of 20 mm a side (a broken but in-range header) would be some 700 voxels a side at
    the model's spacing: refused before its read, by its header; the cases beside it are written."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for name in ("a", "c"):
        write_image(in_dir / f"{name}_0000.nii.gz", ct_like((16, 40, 36)), spacing_xyz=(2, 2, 3))
    write_image(in_dir / "b_0000.nii.gz", ct_like((100, 100, 100)), spacing_xyz=(20, 20, 20))
    budget = Budget.from_config(config)
    small, huge = budget.need(in_dir / "a_0000.nii.gz"), budget.need(in_dir / "b_0000.nii.gz")
    in_use = memory.resident_bytes()
    limit = in_use + 4 * small.total + 2**28
    assert huge.total > limit - in_use + 2**31  # far beyond, whatever the process grows by meanwhile
    budget.limit, budget.source = limit, "test limit"
    read = []
    original = io.read_case

    def reading(case):
        read.append(case.case_id)
        return original(case)

    pipeline.io.read_case = reading
    try:
        failures = run_folder(Predictor.from_config(config), in_dir, tmp_path / "out", budget=budget)
    finally:
        pipeline.io.read_case = original
    assert failures == 1 and read == ["a", "c"]  # the huge case was never read
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "c.nii.gz"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("b_0000.nii.gz: needs about ") and "test limit" in errors[0]


def test_the_next_case_is_read_ahead_only_when_both_fit(config, tmp_path, monkeypatch):
    """With nothing else in use, a limit that holds either case alone but not one case's work beside
    the other's read: each read starts only after the previous case is segmented. With room for both,
    the second read overlaps the first case."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for name in ("a", "b"):
        write_image(in_dir / f"{name}_0000.nii.gz", ct_like((40, 96, 96)), spacing_xyz=(1, 1, 1.5))
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)
    events: list[str] = []
    lock = threading.Lock()
    original = io.read_case

    def reading(case):
        with lock:
            events.append(f"read {case.case_id}")
        return original(case)

    monkeypatch.setattr(pipeline.io, "read_case", reading)

    predictor = Predictor.from_config(config)
    segment = predictor.labels

    def segmenting(volume, timings):
        labels = segment(volume, timings)
        with lock:
            events.append(f"segmented {volume.array_zyx.shape[0]}")
        return labels

    monkeypatch.setattr(predictor, "labels", segmenting)
    budget = Budget.from_config(config)
    need = budget.need(in_dir / "a_0000.nii.gz")
    for limit, expected in ((need.total + need.read // 2, ["read a", "segmented 40", "read b", "segmented 40"]),
                            (need.total + need.read, ["read a", "read b", "segmented 40", "segmented 40"])):
        budget.limit = limit
        events.clear()
        out = tmp_path / f"out{limit}"
        assert run_folder(predictor, in_dir, out, budget=budget) == 0
        assert events == expected
        assert math.prod(io.read_image(out / "b.nii.gz").array_zyx.shape) == 40 * 96 * 96


def test_configured_limit_is_read_from_the_task_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[inference]\nmemory_limit_gb = 2.5\n')
    assert load_config(path).inference.memory_limit_gb == 2.5
