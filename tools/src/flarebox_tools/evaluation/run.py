"""Running one case the organisers' way, through Docker or through the local predict path.

Each case gets a fresh inputs folder holding only its image and a fresh outputs folder. Docker:
    docker container run --shm-size=28gb -m MEM [--gpus "device=0"] --name NAME --rm \
        -v IN/:/workspace/inputs/ -v OUT/:/workspace/outputs/ IMAGE /bin/bash -c "sh predict.sh"
plus two flags that change nothing inside the container: `--network none` (our engines run without
a bridge network; a submission needs none) and `--cidfile` (to find the container's cgroup while it
runs). Local: `sh TASK/predict.sh` with INPUT_DIR / OUTPUT_DIR and the venv first on PATH, as
`make predict` does. Time is the wall clock around the whole command, as the organisers take it:
container start, imports and model loading count.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flarebox_tools.evaluation.monitor import CgroupSampler, GpuSampler, HostUsage, ProcessTreeSampler, gpu_available
from flarebox_tools.paths import REPO as ROOT

CONTAINER_IN, CONTAINER_OUT = "/workspace/inputs/", "/workspace/outputs/"


@dataclass
class RunResult:
    """One case's run: what it produced and what it used."""

    case_id: str
    seconds: float
    returncode: int | None  # None: killed at the timeout
    prediction: Path | None  # the output file, None when none was written
    log_tail: str
    gpu_peak_mb: float | None = None
    gpu_area_mb_s: float | None = None
    host: HostUsage = field(default_factory=HostUsage)
    notes: list[str] = field(default_factory=list)

    @property
    def failure(self) -> str:
        """Why the case failed, or "" when it ran and wrote its output."""
        if self.returncode is None:
            return f"timed out after {self.seconds:.0f} s"
        if self.returncode != 0:
            last = self.log_tail.strip().splitlines()[-1:] or [""]
            return f"exit status {self.returncode}: {last[0][:160]}"
        if self.prediction is None:
            return "no output written"
        return ""


def docker_engine_reachable() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, check=False).returncode == 0


def docker_image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode == 0


def image_name(task: str, team: str = "flarebox") -> str:
    """The image `make build TASK=...` tags."""
    return f"{team}-{task.replace('_', '-')}:latest"


def memory_limit(task: str) -> str:
    """Docker's -m per task, as in the Makefile: the CPU task runs in 8G, the GPU tasks in 28G."""
    return "8G" if task.startswith("task2") else "28G"


def wants_gpu(task: str) -> bool:
    """`--gpus` for the GPU tasks where a GPU exists; Task 2 runs as the organisers' CPU analogue, without."""
    return not task.startswith("task2") and gpu_available()


def docker_command(image: str, inputs: Path, outputs: Path, *, memory: str, container_name: str, gpu: bool,
                   cidfile: Path | None = None, user: str | None = None) -> list[str]:
    """The organisers' command for one case (see the module docstring for the two added flags);
    `user` ('uid:gid') runs it as that user instead of the image's root."""
    cmd = ["docker", "container", "run", "--shm-size=28gb", "-m", memory]
    if gpu:
        cmd += ["--gpus", "device=0"]
    if user is not None:
        cmd += ["--user", user]
    cmd += ["--name", container_name, "--rm", "--network", "none"]
    if cidfile is not None:
        cmd += ["--cidfile", str(cidfile)]
    cmd += ["-v", f"{inputs}/:{CONTAINER_IN}", "-v", f"{outputs}/:{CONTAINER_OUT}", image, "/bin/bash", "-c",
            "sh predict.sh"]
    return cmd


def local_command(task_dir: Path) -> list[str]:
    return ["sh", str(task_dir / "predict.sh")]


def local_env(inputs: Path, outputs: Path, venv_bin: Path) -> dict[str, str]:
    """`make predict`'s environment, plus this checkout's engine first on PYTHONPATH: the image would be
    built from it, while the venv's editable install may point at another checkout."""
    python_path = os.pathsep.join(p for p in (str(ROOT / "common" / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "INPUT_DIR": str(inputs), "OUTPUT_DIR": str(outputs), "PYTHONPATH": python_path,
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}


def default_venv_bin() -> Path:
    """The project's .venv where it exists (as `make predict` uses), else this interpreter's."""
    import sys

    own = ROOT / ".venv" / "bin"
    return own if (own / "python3").exists() else Path(sys.executable).parent


def _container_pid(cidfile: Path) -> int | None:
    """The container's init pid on the host, once Docker has written its id and started it."""
    try:
        container_id = cidfile.read_text().strip()
    except OSError:
        return None
    if not container_id:
        return None
    result = subprocess.run(["docker", "container", "inspect", "-f", "{{.State.Pid}}", container_id],
                            capture_output=True, text=True, check=False)
    pid = int(result.stdout.strip() or 0) if result.returncode == 0 else 0
    return pid or None


def _stage(case_image: Path, work: Path, owner: str | None = None) -> tuple[Path, Path]:
    """A fresh inputs folder holding only this case, and a fresh, empty outputs folder (given to
    `owner`, 'uid:gid', where the container runs as that user)."""
    work.mkdir(parents=True, exist_ok=True)
    inputs = Path(tempfile.mkdtemp(prefix="inputs_", dir=work))
    outputs = Path(tempfile.mkdtemp(prefix="outputs_", dir=work))
    shutil.copy(case_image, inputs / case_image.name)
    inputs.chmod(0o755)  # mkdtemp makes 0700: a container's non-root --user could not read it
    outputs.chmod(0o755)  # as the organisers create it: owned by the harness's user, 0755
    if owner is not None:
        uid, gid = (int(v) for v in owner.split(":"))
        os.chown(outputs, uid, gid)
    return inputs, outputs


def _collect(case_id: str, inputs: Path, outputs: Path, result: RunResult, predictions: Path) -> None:
    """Move the prediction out, noting what the organisers' harness would object to."""
    expected = outputs / f"{case_id}.nii.gz"
    others = sorted(p.name for p in outputs.iterdir() if p != expected)
    if others:
        result.notes.append(f"extra files in outputs: {', '.join(others[:5])}")
    left = sorted(p.name for p in inputs.iterdir() if p.name != f"{case_id}_0000.nii.gz")
    if left:
        result.notes.append(f"files written into inputs: {', '.join(left[:5])}")
    if expected.is_file():
        predictions.mkdir(parents=True, exist_ok=True)
        result.prediction = Path(shutil.move(str(expected), predictions / expected.name))
    shutil.rmtree(inputs, ignore_errors=True)
    shutil.rmtree(outputs, ignore_errors=True)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended as the timer fired
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, n_chars: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n_chars))
        return f.read().decode(errors="replace")


def run_docker_case(case_id: str, case_image: Path, *, image: str, task: str, work: Path, predictions: Path,
                    container_name: str, timeout_s: float, gpu: bool | None = None,
                    user: str | None = None) -> RunResult:
    """One case in a container; a container still running at `timeout_s` is killed and the case failed."""
    gpu = wants_gpu(task) if gpu is None else gpu
    inputs, outputs = _stage(case_image, work, user)
    cidfile = work / f"{case_id}.cid"
    cidfile.unlink(missing_ok=True)
    cmd = docker_command(image, inputs, outputs, memory=memory_limit(task), container_name=container_name, gpu=gpu,
                         cidfile=cidfile, user=user)
    log = work / f"{case_id}.log"
    gpu_sampler = GpuSampler(0).start()
    host_sampler = CgroupSampler(lambda: _container_pid(cidfile)).start()
    with open(log, "wb") as log_file:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            subprocess.run(["docker", "container", "kill", container_name], capture_output=True, check=False)
            proc.wait()
            returncode = None
        seconds = time.perf_counter() - start
    gpu_sampler.stop()
    result = RunResult(case_id, seconds, returncode, None, _tail(log), gpu_sampler.peak_mb, gpu_sampler.area_mb_s,
                       host_sampler.stop())
    if host_sampler.note:
        result.notes.append(host_sampler.note)
    cidfile.unlink(missing_ok=True)
    _collect(case_id, inputs, outputs, result, predictions)
    return result


def run_local_case(case_id: str, case_image: Path, *, task_dir: Path, work: Path, predictions: Path,
                   timeout_s: float, venv_bin: Path | None = None) -> RunResult:
    """One case through `sh TASK/predict.sh`; its process group is killed at `timeout_s`."""
    inputs, outputs = _stage(case_image, work)
    env = local_env(inputs, outputs, venv_bin or default_venv_bin())
    log = work / f"{case_id}.log"
    gpu_sampler = GpuSampler(0).start()
    with open(log, "wb") as log_file:
        start = time.perf_counter()
        proc = subprocess.Popen(local_command(task_dir), stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        host_sampler = ProcessTreeSampler(proc.pid).start()
        timer = threading.Timer(timeout_s, _kill_group, (proc.pid,))
        timer.start()
        # wait4, not wait: its rusage is the CPU time of the process and every descendant it reaped
        _, status, rusage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        timed_out = not timer.is_alive()
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    gpu_sampler.stop()
    host = host_sampler.stop(rusage.ru_utime + rusage.ru_stime, seconds)
    returncode = None if timed_out else proc.returncode
    result = RunResult(case_id, seconds, returncode, None, _tail(log), gpu_sampler.peak_mb, gpu_sampler.area_mb_s,
                       host)
    _collect(case_id, inputs, outputs, result, predictions)
    return result
