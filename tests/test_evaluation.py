"""The evaluation harness (flarebox_tools.evaluation), run for real: Task 2's own predict.sh with its bundled demo
model on tiny phantoms, a broken case among them, the report read back and checked against
flarebox_tools.metrics on the same files. The Docker path runs where an engine is reachable; in CI (where
.ci/run starts one) its absence is an error, not a skip.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flarebox_tools.evaluation import run
from flarebox_tools.evaluation.evaluate import HarnessError, choose_path, evaluate
from flarebox_tools.evaluation.monitor import GpuSampler, cgroup_paths, gpu_available
from flarebox_tools.evaluation.report import TASK_LIMITS, CaseRow, Limits, flag_limits, read_csv
from flarebox_tools.metrics import ORGAN_NAMES, score_files
from flarebox_tools.phantoms import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TASK = "task2_cpu_organs"
TIGHT = Limits(time_s=0.5, gpu_mb=None, ram_mb=8192.0, source="test: 0.5 s")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny phantoms (about 0.4 M voxels) and, between them, a truncated file with a reference."""
    root = write_dataset(tmp_path_factory.mktemp("phantoms"), 2, seed=100, spacing_scale=4.0)
    images, labels = root / "imagesTr", root / "labelsTr"
    (images / "phantom_0100b_0000.nii.gz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    shutil.copy(labels / "phantom_0100.nii.gz", labels / "phantom_0100b.nii.gz")
    return images, labels


@pytest.fixture(scope="module")
def local_run(dataset, tmp_path_factory):
    images, labels = dataset
    out = tmp_path_factory.mktemp("local")
    rows, choice = evaluate(TASK, images, labels, out / "report", path="local", limits=TIGHT, work_dir=out / "work")
    return rows, choice, out


def test_every_case_is_a_csv_row_and_the_failure_does_not_stop_the_rest(local_run, dataset):
    rows, choice, out = local_run
    assert choice.path == "local"
    table = read_csv(out / "report" / "cases.csv")
    assert [r["case"] for r in table] == ["phantom_0100", "phantom_0100b", "phantom_0101"]
    ok = [r for r in table if r["status"] == "ok"]
    assert len(ok) == 2
    for r in ok:
        shape = tuple(int(v) for v in r["shape_zyx"].split("x"))
        assert int(r["voxels"]) == math.prod(shape) > 0
        assert float(r["seconds"]) > 0.5 and float(r["ram_peak_mb"]) > 100 and float(r["cpu_mean_pct"]) > 0
        if gpu_available():
            assert float(r["gpu_peak_mb"]) > 0 and float(r["gpu_area_mb_s"]) > 0
        else:
            assert r["gpu_peak_mb"] == r["gpu_area_mb_s"] == ""  # no GPU: empty, not zero
    (broken,) = [r for r in table if r["case"] == "phantom_0100b"]
    assert broken["status"].startswith("failed: exit status")
    assert all(float(broken[f"dsc_{n}"]) == 0 and float(broken[f"nsd_{n}"]) == 0 for n in ORGAN_NAMES)
    assert "cannot read" in broken["notes"]  # the engine's one-line reason reaches the report


def test_scores_are_flarebox_metrics_on_the_same_files(local_run, dataset):
    rows, _, out = local_run
    _, labels = dataset
    table = {r["case"]: r for r in read_csv(out / "report" / "cases.csv")}
    for row in rows:
        if row.failure:
            continue
        expected = score_files(out / "work" / "predictions" / f"{row.case_id}.nii.gz",
                               labels / f"{row.case_id}.nii.gz", "organs")
        assert row.scores == expected
        for name in ORGAN_NAMES:
            assert float(table[row.case_id][f"dsc_{name}"]) == pytest.approx(expected[name]["dsc"], abs=5e-5)
            assert float(table[row.case_id][f"nsd_{name}"]) == pytest.approx(expected[name]["nsd"], abs=5e-5)
    assert any(row.mean("dsc") > 0.1 for row in rows)  # the demo model finds organs: not all zeros


def test_cases_over_the_time_limit_are_flagged(local_run):
    rows, _, out = local_run
    table = read_csv(out / "report" / "cases.csv")
    timed = [r for r in table if float(r["seconds"]) > 0.5]
    assert timed and all(r["over_limit"].startswith("time ") for r in timed)
    summary = (out / "report" / "summary.md").read_text()
    assert "seconds (limit 0.5 s)" in summary and "**time " in summary


def test_flags_only_what_is_over():
    row = CaseRow("c", (2, 2, 2), (1.0, 1.0, 1.0), seconds=44.0, gpu_peak_mb=4100.0, ram_peak_mb=9000.0)
    flag_limits(row, TASK_LIMITS["task1"])
    assert row.over_limit == ["GPU 4100 > 4096 MB"]
    flag_limits(row, TASK_LIMITS["task2"])
    assert row.over_limit == ["RAM 9000 > 8192 MB"]
    row.seconds = 16.0
    flag_limits(row, TASK_LIMITS["task3"])
    assert row.over_limit == ["time 16 > 15 s", "GPU 4100 > 4096 MB"]


def test_summary_says_which_path_ran_and_lists_the_failure(local_run):
    _, _, out = local_run
    summary = (out / "report" / "summary.md").read_text()
    assert "local predict path" in summary and "`phantom_0100b`: exit status" in summary
    assert "| liver |" in summary and "process tree" in summary


def test_figures_are_small_pngs(local_run):
    pytest.importorskip("matplotlib")
    _, _, out = local_run
    for name in ("dsc_per_class.png", "time_vs_size.png", "overlay_best_worst.png"):
        data = (out / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000


def test_scoring_only_gives_the_same_scores_and_fails_missing_predictions(local_run, dataset, tmp_path):
    rows, _, out = local_run
    _, labels = dataset
    predictions = tmp_path / "predictions"
    shutil.copytree(out / "work" / "predictions", predictions)
    (predictions / "phantom_0101.nii.gz").unlink()
    (predictions / "phantom_0100b.nii.gz").write_bytes(b"\x1f\x8b truncated")
    scored, choice = evaluate(TASK, None, labels, tmp_path / "report", predictions=predictions)
    assert choice.path == "predictions"
    by_id = {r.case_id: r for r in scored}
    assert by_id["phantom_0100"].scores == next(r for r in rows if r.case_id == "phantom_0100").scores
    assert by_id["phantom_0100b"].failure.startswith("cannot score phantom_0100b.nii.gz: ")
    assert by_id["phantom_0101"].failure == "no prediction"
    assert all(r.seconds is None for r in scored)
    table = read_csv(tmp_path / "report" / "cases.csv")
    assert [r["seconds"] for r in table] == ["", "", ""]


def test_command_line_scoring_only_exits_1_when_a_case_failed(local_run, dataset, tmp_path):
    _, _, out = local_run
    _, labels = dataset
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "common" / "src"), str(ROOT)])}
    result = subprocess.run([sys.executable, "-m", "flarebox_tools.evaluation", "-t", TASK, "-g", str(labels), "-r",
                             str(tmp_path / "r"), "-p", str(out / "work" / "predictions")],
                            capture_output=True, text=True, cwd=ROOT, env=env, check=False, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "phantom_0100b: FAILED (no prediction)" in result.stdout and "3 cases, 1 failed" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "flarebox_tools.evaluation", "-t", TASK,
                              "-g", str(tmp_path / "nowhere"),
                              "-r", str(tmp_path / "r2"), "-i", str(tmp_path)],
                             capture_output=True, text=True, cwd=ROOT, env=env, check=False, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().endswith("no such folder of reference labels")


def test_a_hung_case_is_killed_at_the_timeout(dataset, tmp_path):
    images, _ = dataset
    result = run.run_local_case("phantom_0100", images / "phantom_0100_0000.nii.gz", task_dir=ROOT / TASK,
                                work=tmp_path / "w", predictions=tmp_path / "p", timeout_s=0.5)
    assert result.returncode is None and result.failure.startswith("timed out")
    assert result.seconds < 5 and result.prediction is None


def test_process_tree_memory_and_cpu_are_measured(tmp_path):
    """A predict.sh whose Python child holds 300 MB and burns 1 s of CPU, then writes its output."""
    task = tmp_path / "task"
    task.mkdir()
    (task / "work.py").write_text(
        "import os, time\n"
        "block = b'x' * (300 * 2**20)  # touched, so resident\n"
        "while time.process_time() < 1.0:\n    pass\n"
        "open(os.environ['OUTPUT_DIR'] + '/x.nii.gz', 'wb').write(b'1')\n")
    (task / "predict.sh").write_text('exec python3 "$(dirname "$0")/work.py"\n')
    image = tmp_path / "x_0000.nii.gz"
    image.write_bytes(b"0")
    result = run.run_local_case("x", image, task_dir=task, work=tmp_path / "w", predictions=tmp_path / "p",
                                timeout_s=60, venv_bin=Path(sys.executable).parent)
    assert result.failure == "" and result.prediction is not None
    assert 300 <= result.host.peak_ram_mb < 1000
    assert result.host.mean_cpu_pct * result.seconds / 100 >= 1.0  # the child's CPU time is counted


def test_no_gpu_gives_no_figures_rather_than_zeros():
    sampler = GpuSampler(0).start()
    sampler.stop()
    if gpu_available():
        assert sampler.peak_mb is not None and sampler.peak_mb > 0
    else:
        assert sampler.peak_mb is None and sampler.area_mb_s is None and sampler.source == "none"


def test_own_cgroup_is_found():
    paths = cgroup_paths(os.getpid())
    assert paths and all(str(p).startswith("/sys/fs/cgroup") for p in paths.values())


def test_docker_path_refused_without_engine_or_image():
    if run.docker_engine_reachable():
        with pytest.raises(HarnessError, match="is not built"):
            choose_path("docker", "flarebox-no-such-image:latest", ROOT / TASK)
    else:
        with pytest.raises(HarnessError, match="no Docker engine reachable"):
            choose_path("docker", run.image_name(TASK), ROOT / TASK)
        auto = choose_path("auto", run.image_name(TASK), ROOT / TASK)
        assert auto.path == "local" and "because no Docker engine reachable" in auto.description


# ---- the Docker path, for real ---------------------------------------------------------------------------

def _docker_or_skip() -> None:
    if run.docker_engine_reachable():
        return
    if os.environ.get("CI"):
        raise RuntimeError("no Docker engine reachable: CI must start one (.ci/run does, via make engine)")
    pytest.skip("no Docker engine (make engine starts one)")


def test_docker_path_scores_what_the_local_path_scores(local_run, dataset, tmp_path):
    _docker_or_skip()
    build = subprocess.run(["make", "-C", str(ROOT), "build", f"TASK={TASK}"], capture_output=True, text=True,
                           check=False, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    images, labels = dataset
    one = tmp_path / "images"
    one.mkdir()
    shutil.copy(images / "phantom_0100_0000.nii.gz", one)
    rows, choice = evaluate(TASK, one, labels, tmp_path / "report", path="docker", work_dir=tmp_path / "work")
    assert choice.path == "docker" and "docker container run" in choice.description
    (row,) = rows
    assert row.failure == "" and row.notes == []  # nothing but the output written, inputs untouched
    assert row.ram_peak_mb is not None and row.ram_peak_mb > 50  # the container's cgroup was read
    assert row.cpu_mean_pct is not None and row.cpu_mean_pct > 0
    local = next(r for r in local_run[0] if r.case_id == "phantom_0100")
    assert row.scores == local.scores
    assert "the container's cgroup" in (tmp_path / "report" / "summary.md").read_text()
