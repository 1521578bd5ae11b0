"""The images, built for real and run the way the organisers run them.

Each case gets a fresh inputs folder holding that one file and a fresh root-owned outputs folder,
then `docker container run ... /bin/bash -c "sh predict.sh"` with --network none, a read-only root
file system (a tmpfs on /tmp) and a memory limit. The container's output must equal, byte for byte,
what `make predict` writes locally, and nothing may be written into the inputs. In CI the Docker
engine is installed and started by .ci/run; without it these tests fail there rather than skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flarebox_tools.synthetic import ct_like, oblique, write_image

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"task2_cpu_organs": "8G", "task1_pancancer": "28G", "task3_mri_transfer": "28G"}


def engine_running() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, check=False).returncode == 0


if not engine_running():
    if os.environ.get("CI"):
        raise RuntimeError("no Docker engine reachable: CI must start one (.ci/run does, via make engine)")
    pytest.skip("no Docker engine (make engine starts one)", allow_module_level=True)

BUILDABLE = [t for t in TASKS if (ROOT / t / "Dockerfile").exists() and (ROOT / t / "weights" / "model").exists()]


def image_name(task: str) -> str:
    return f"flarebox-{task.replace('_', '-')}:latest"


@pytest.fixture(scope="module", params=BUILDABLE)
def built(request):
    task = request.param
    result = subprocess.run(["make", "-C", str(ROOT), "build", f"TASK={task}"], capture_output=True, text=True,
                            check=False, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return task


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def cases(tmp_path: Path) -> list[Path]:
    src = tmp_path / "cases"
    src.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "inputs" / "ts_ct_sm_0000.nii.gz", src)
    write_image(src / "oblique_0000.nii.gz", ct_like((23, 61, 57), seed=5), spacing_xyz=(0.9, 1.1, 3.0),
                origin=(-5, 7, 2), direction=oblique())
    return sorted(src.iterdir())


def docker_run(task: str, inputs: Path, outputs: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["docker", "container", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
           "-m", TASKS[task], *extra, "-v", f"{inputs}/:/workspace/inputs/", "-v", f"{outputs}/:/workspace/outputs/",
           image_name(task), "/bin/bash", "-c", "sh predict.sh"]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)


def test_one_case_per_run_equals_local_predict(built, tmp_path):
    task = built
    local_out = tmp_path / "local"
    all_cases = cases(tmp_path)
    result = subprocess.run(["make", "-C", str(ROOT), "predict", f"TASK={task}", f"IN={all_cases[0].parent}",
                             f"OUT={local_out}"], capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for case in all_cases:
        inputs, outputs = tmp_path / f"in_{case.name}", tmp_path / f"out_{case.name}"
        inputs.mkdir()
        outputs.mkdir(mode=0o755)  # root-owned, as the harness makes it
        shutil.copy(case, inputs)
        before = digest(inputs)
        run = docker_run(task, inputs, outputs)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        expected = case.name.replace("_0000.nii.gz", ".nii.gz")
        assert os.listdir(outputs) == [expected]  # nothing else: no logs, no temporary files
        assert digest(inputs) == before  # inputs untouched
        assert (outputs / expected).read_bytes() == (local_out / expected).read_bytes()


def test_the_image_holds_the_runtime_only(built):
    """The images carry flarebox's runtime wing, not the host-side tools (training, phantoms,
    evaluation, benchmarks, conversion); Task 2's has no torch either."""
    probe = ("import importlib.util as u, pathlib, flarebox; "
             "print(sorted(p.stem for p in pathlib.Path(flarebox.__file__).parent.rglob('*.py'))); "
             "print(u.find_spec('flarebox_tools') is None, u.find_spec('torch') is None, "
             "u.find_spec('nncf') is None, u.find_spec('matplotlib') is None)")
    run = subprocess.run(["docker", "container", "run", "--rm", "--network", "none", image_name(built), "python3",
                          "-c", probe], capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    modules, flags = run.stdout.splitlines()
    for tool in ("trainer", "phantoms", "metrics", "convert", "evaluate", "demo"):
        assert f"'{tool}'" not in modules, modules
    assert "'pipeline'" in modules and "'sliding_window'" in modules
    no_tools, no_torch, no_nncf, no_matplotlib = (flag == "True" for flag in flags.split())
    assert no_tools and no_nncf and no_matplotlib
    assert no_torch == (built == "task2_cpu_organs")


def test_runs_as_a_non_root_user(built, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    os.chown(outputs, 1000, 1000)
    write_image(inputs / "user_0000.nii.gz", ct_like((20, 48, 40)).astype(np.int16), spacing_xyz=(2, 2, 3))
    run = docker_run(built, inputs, outputs, "--user", "1000:1000")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert os.listdir(outputs) == ["user.nii.gz"] and (outputs / "user.nii.gz").stat().st_uid == 1000
    assert "telemetry" not in run.stderr.lower()


def test_an_unreadable_input_folder_is_one_line(built, tmp_path):
    """An inputs folder the container's --user may not list (root's, mode 0700): one line, exit 2."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(mode=0o700)
    outputs.mkdir()
    os.chown(outputs, 1000, 1000)
    write_image(inputs / "hidden_0000.nii.gz", ct_like((20, 48, 40)), spacing_xyz=(2, 2, 3))
    run = docker_run(built, inputs, outputs, "--user", "1000:1000")
    assert run.returncode == 2 and os.listdir(outputs) == []
    assert "cannot read the input folder: Permission denied" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_bad_case_fails_the_run_and_writes_nothing(built, tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    (inputs / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    run = docker_run(built, inputs, outputs)
    assert run.returncode != 0 and os.listdir(outputs) == []
    assert "broken_0000.nii.gz: cannot read" in run.stdout + run.stderr


GPU_TASKS = [t for t in BUILDABLE if t != "task2_cpu_organs"]


@pytest.mark.parametrize("task", GPU_TASKS)
def test_gpu_image_holds_the_cuda_build_of_torch_and_loads_cudnn(task, tmp_path):
    """The default build of a GPU task (TORCH_BUILD=cuda): inside the image, on this machine without
    a GPU, torch is PyPI's CUDA build, reports its CUDA version and loads cuDNN from its wheels;
    predict.sh then says loudly that it found no GPU and names the device it runs on."""
    built = subprocess.run(["make", "-C", str(ROOT), "build", f"TASK={task}", "TORCH_BUILD=cuda"],
                           capture_output=True, text=True, check=False, timeout=3600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    probe = ("import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.is_available(), "
             "torch.backends.cudnn.version(), torch.cuda.is_available())")
    run = subprocess.run(["docker", "container", "run", "--rm", "--network", "none", image_name(task), "python3", "-c",
                          probe], capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    version, cuda, has_cudnn, cudnn, gpu = run.stdout.split()
    assert version.startswith("2.13.0") and "+cpu" not in version  # PyPI's CUDA build, 2.13.0+cu130
    assert cuda.startswith("13.") and has_cudnn == "True" and gpu == "False"
    assert int(cudnn) >= 90000  # cuDNN 9, loaded from the nvidia-cudnn wheel
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    write_image(inputs / "nogpu_0000.nii.gz", ct_like((20, 48, 40)), spacing_xyz=(2, 2, 3))
    run = docker_run(task, inputs, outputs)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    log = run.stdout + run.stderr
    assert "WARNING: no GPU found" in log and "torch f32 on cpu," in log  # the device and precision used
    assert os.listdir(outputs) == ["nogpu.nii.gz"]


def test_a_case_beyond_the_memory_limit_is_refused_and_the_others_written(tmp_path):
    """Task 2's image under `-m 2g`: a case whose header says it would need far more (100 voxels of
    20 mm a side become 800 of 2.5 mm) is refused in one line before it is read, and the cases beside
    it are written; the container is not killed (exit 1 for the one failed case, not 137)."""
    task = "task2_cpu_organs"
    built = subprocess.run(["make", "-C", str(ROOT), "build", f"TASK={task}"], capture_output=True, text=True,
                           check=False, timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    for name in ("a", "c"):
        write_image(inputs / f"{name}_0000.nii.gz", ct_like((30, 80, 70), seed=1), spacing_xyz=(1.5, 1.5, 3))
    write_image(inputs / "b_0000.nii.gz", ct_like((100, 100, 100), seed=2), spacing_xyz=(20, 20, 20))
    cmd = ["docker", "container", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "-m", "2g",
           "-v", f"{inputs}/:/workspace/inputs/", "-v", f"{outputs}/:/workspace/outputs/", image_name(task),
           "/bin/bash", "-c", "sh predict.sh"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-3000:]
    assert sorted(os.listdir(outputs)) == ["a.nii.gz", "c.nii.gz"]
    refused = [line for line in log.splitlines() if "b_0000.nii.gz" in line]
    assert len(refused) == 1 and "needs about" in refused[0] and "2.0 GB container limit" in refused[0], log[-3000:]
    assert "memory 2.0 GB (container limit)" in log


def test_compose_file_validates():
    compose = shutil.which("docker-compose")
    cmd = [compose, "config", "-q"] if compose else ["docker", "compose", "config", "-q"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
