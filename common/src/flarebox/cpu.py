"""The CPU this process runs on: its instruction sets, and the OpenVINO precision they favour.

INT8 pays where the CPU multiplies 8-bit integers natively (VNNI: AVX-512 VNNI, AVX-VNNI or AMX):
there the INT8 tile of the Task 2 network takes a quarter of f32's time (docs/benchmarks.md).
Without VNNI, AVX2's 8-bit products go through 16-bit sums that can saturate, which is why the INT8
IR is quantised with NNCF's overflow fix on every layer (flarebox_tools.convert): its error then
stays near VNNI's, at 1.7x f32's speed there instead of 4x. bf16 pays only with AVX-512 BF16 or AMX;
elsewhere OpenVINO emulates it, many times slower than f32.
"""

from __future__ import annotations

from pathlib import Path

VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})
REPORTED = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where they cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))


def cpu_description() -> str:
    """The CPU's model name, thread count and the instruction sets that decide the network's speed."""
    import os

    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    flags = cpu_flags()
    return f"{name}, {os.cpu_count()} threads, " + (" ".join(f for f in REPORTED if f in flags) or "no AVX2")


def openvino_precision(has_int8: bool, flags: set[str] | None = None) -> tuple[str, str]:
    """The precision `auto` runs on this CPU, and why (for the log): INT8 where the model has an
    INT8 IR (4x f32's speed with VNNI, 1.7x without, its accuracy measured on both kinds in
    docs/benchmarks.md); else bf16 where the CPU computes it natively; else f32."""
    flags = cpu_flags() if flags is None else flags
    vnni = sorted(flags & VNNI)
    if has_int8:
        return "int8", f"VNNI: {' '.join(vnni)}" if vnni else "no VNNI: INT8 still 1.7x faster than f32"
    if flags & NATIVE_BF16:
        return "bf16", f"no INT8 IR; native bf16: {' '.join(sorted(flags & NATIVE_BF16))}"
    return "f32", "no INT8 IR, no native bf16"
