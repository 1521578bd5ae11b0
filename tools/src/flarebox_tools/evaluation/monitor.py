"""Resource sampling around one case: GPU memory of the whole device, and CPU and RAM of what runs it.

GPU: every 0.1 s, used = total - free of the device, as the organisers sample it; through NVML
(`pynvml`) when importable, else one long-lived `nvidia-smi --query-gpu=memory.total,memory.free
-lms 100` process (one process, not one per sample: starting nvidia-smi takes longer than 0.1 s on
some hosts). Not nvidia-smi's memory.used: it leaves out what the driver reserves (480 MB seen on an
H100), so it reads lower than total - free.
Peak in MB, and the area under the curve as the organisers score it: sum of samples x 0.1 s (MB*s).

CPU and RAM, sampled on the same 0.1 s clock:
- a container: its own cgroup, the figures `docker stats` shows. RAM = memory usage less inactive
  file cache (what `docker stats` subtracts: page cache the kernel can drop is not the model's
  memory); CPU = the cgroup's CPU-time counter, whose difference over the wall time is the
  utilisation in % of one core. The cgroup is found from the container's init process
  (/proc/PID/cgroup), so cgroup v1 and v2, and either cgroup driver, read alike.
- a local process: the summed RSS of its process tree (the pipeline may fork workers; ru_maxrss
  would carry a parent's high-water mark into children), and CPU time from the kernel's rusage of
  the finished process and everything it waited for (exact, not sampled).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_INTERVAL_S = 0.1
CGROUP_ROOT = Path("/sys/fs/cgroup")


# ---- GPU ---------------------------------------------------------------------------------------------

def _nvml_reader(device_index: int) -> tuple[Callable[[], float], Callable[[], None], str] | None:
    """NVML's used memory of one device in MB, or None when pynvml or a driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        name = pynvml.nvmlDeviceGetName(handle)
    except pynvml.NVMLError:
        return None

    def read() -> float:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return (info.total - info.free) / 2**20

    return read, pynvml.nvmlShutdown, f"NVML ({name if isinstance(name, str) else name.decode()})"


def gpu_available() -> bool:
    """True when a GPU can be sampled (NVML or nvidia-smi) and `--gpus` can be passed."""
    if _nvml_reader(0) is not None:
        return True
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True, check=False).returncode == 0


class GpuSampler:
    """Samples one device's used memory every 0.1 s in a thread (NVML) or a streaming nvidia-smi."""

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index
        self.samples_mb: list[float] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smi: subprocess.Popen | None = None

    def start(self) -> GpuSampler:
        nvml = _nvml_reader(self.device_index)
        if nvml is not None:
            read, shutdown, self.source = nvml

            def loop() -> None:
                next_t = time.perf_counter()
                while not self._stop.is_set():
                    self.samples_mb.append(read())
                    next_t += SAMPLE_INTERVAL_S
                    self._stop.wait(max(0.0, next_t - time.perf_counter()))
                shutdown()

            self._thread = threading.Thread(target=loop, daemon=True)
        elif gpu_available():
            self.source = "nvidia-smi (total - free) -lms 100"
            self._smi = subprocess.Popen(
                ["nvidia-smi", f"--id={self.device_index}", "--query-gpu=memory.total,memory.free",
                 "--format=csv,noheader,nounits",
                 "-lms", str(int(SAMPLE_INTERVAL_S * 1000))], stdout=subprocess.PIPE, text=True)

            def loop() -> None:
                assert self._smi is not None and self._smi.stdout is not None
                for line in self._smi.stdout:
                    if line.strip():
                        total_mb, free_mb = (float(v) for v in line.split(","))
                        self.samples_mb.append(total_mb - free_mb)

            self._thread = threading.Thread(target=loop, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def peak_mb(self) -> float | None:
        return max(self.samples_mb) if self.samples_mb else None

    @property
    def area_mb_s(self) -> float | None:
        return float(np.sum(self.samples_mb) * SAMPLE_INTERVAL_S) if self.samples_mb else None


# ---- CPU and RAM -------------------------------------------------------------------------------------

@dataclass
class HostUsage:
    """What one case used on the host: peak RAM (MB) and mean CPU (% of one core; 200 = two cores busy)."""

    peak_ram_mb: float | None = None
    mean_cpu_pct: float | None = None
    ram_samples_mb: list[float] = field(default_factory=list)


class ProcessTreeSampler:
    """Summed RSS of a local process and its descendants, every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.usage = HostUsage()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> ProcessTreeSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while True:
            try:
                members = [root, *root.children(recursive=True)]
                total = 0
                for member in members:
                    with contextlib.suppress(psutil.Error):  # a child exited between listing and reading
                        total += member.memory_info().rss
                self.usage.ram_samples_mb.append(total / 2**20)
            except psutil.Error:
                pass
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def stop(self, cpu_seconds: float, wall_seconds: float) -> HostUsage:
        self._stop.set()
        self._thread.join(timeout=5)
        samples = self.usage.ram_samples_mb
        self.usage.peak_ram_mb = max(samples) if samples else None
        self.usage.mean_cpu_pct = 100.0 * cpu_seconds / wall_seconds if wall_seconds > 0 else None
        return self.usage


def cgroup_paths(pid: int) -> dict[str, Path]:
    """The cgroup folders of a process by controller ("memory", "cpuacct" on v1; "" on v2)."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, relative = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            base = CGROUP_ROOT / controller if controller else CGROUP_ROOT
            if controller == "" and not (CGROUP_ROOT / "cgroup.controllers").exists():
                base = CGROUP_ROOT / "unified"
            paths[controller] = base / relative.lstrip("/")
    return paths


def _stat_value(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, value = line.split()
        if name == key:
            return int(value)
    return 0


def cgroup_reader(pid: int) -> Callable[[], tuple[float, float]] | None:
    """A reader of (RAM MB as `docker stats` counts it, cumulative CPU seconds) for the cgroup of `pid`;
    None when neither a v2 nor a v1 memory and CPU accounting folder is found."""
    paths = cgroup_paths(pid)
    v2 = paths.get("")
    if v2 is not None and (v2 / "memory.current").exists() and (v2 / "cpu.stat").exists():
        def read_v2() -> tuple[float, float]:
            used = int((v2 / "memory.current").read_text()) - _stat_value(v2 / "memory.stat", "inactive_file")
            return used / 2**20, _stat_value(v2 / "cpu.stat", "usage_usec") / 1e6

        return read_v2
    memory, cpu = paths.get("memory"), paths.get("cpuacct")
    if memory is not None and cpu is not None and (memory / "memory.usage_in_bytes").exists():
        def read_v1() -> tuple[float, float]:
            used = (int((memory / "memory.usage_in_bytes").read_text())
                    - _stat_value(memory / "memory.stat", "total_inactive_file"))
            return used / 2**20, int((cpu / "cpuacct.usage").read_text()) / 1e9

        return read_v1
    return None


class CgroupSampler:
    """RAM and CPU of a container's cgroup every 0.1 s, from the moment its init process is known."""

    def __init__(self, find_pid: Callable[[], int | None]) -> None:
        self.find_pid = find_pid
        self.usage = HostUsage()
        self.note = ""
        self._cpu: list[tuple[float, float]] = []  # (wall time, cumulative CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> CgroupSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        reader = None
        while reader is None and not self._stop.is_set():
            pid = self.find_pid()
            if pid:
                try:
                    reader = cgroup_reader(pid)
                except OSError:  # the container ended before we got there
                    reader = None
                if reader is None:
                    self.note = "container cgroup not readable"
                    return
            else:
                self._stop.wait(0.05)
        while reader is not None:
            try:
                ram_mb, cpu_s = reader()
            except (OSError, ValueError):  # the cgroup is removed when the container exits
                return
            self.usage.ram_samples_mb.append(ram_mb)
            self._cpu.append((time.perf_counter(), cpu_s))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def stop(self) -> HostUsage:
        self._stop.set()
        self._thread.join(timeout=5)
        samples = self.usage.ram_samples_mb
        self.usage.peak_ram_mb = max(samples) if samples else None
        if len(self._cpu) >= 2:
            (t0, c0), (t1, c1) = self._cpu[0], self._cpu[-1]
            self.usage.mean_cpu_pct = 100.0 * (c1 - c0) / (t1 - t0) if t1 > t0 else None
        return self.usage
