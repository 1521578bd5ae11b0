"""The CPU this process runs on: its instruction sets, and the OpenVINO precision they favour.

INT8 pays where the CPU multiplies 8-bit integers natively (VNNI: AVX-512 VNNI, AVX-VNNI or AMX):
there the INT8 tile of the Task 2 network takes a quarter to a third of f32's time. Without VNNI,
AVX2's 8-bit products go through 16-bit sums that can saturate, unless the IR was quantised with
NNCF's overflow fix on every layer (`flarebox-tools convert`'s default, recorded in the manifest):
then INT8 gives the same result there as with VNNI, at 1.7x f32's speed instead of 3-4x. bf16 is
never chosen: even with AVX-512 BF16 its tile took half of f32's time on one of our CPUs (an AMD
EPYC) and 1.55x on another (an Intel Xeon), and without it OpenVINO emulates bf16, many times
slower than f32. Where oneDNN is held below the CPU's instruction sets (ONEDNN_MAX_CPU_ISA, as our
benchmarks do to time an AVX2-only CPU's kernels), the held sets are the CPU the choice is made for.
Measured figures: docs/benchmarks.md.
"""

from __future__ import annotations

import os
from pathlib import Path

VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})
REPORTED = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


AVX512 = frozenset({"avx512f", "avx512_vnni", "avx512_bf16"})
AMX = frozenset({"amx_bf16", "amx_int8"})
# oneDNN, whose kernels OpenVINO's CPU plugin runs, can be held below the CPU's own instruction sets
# (ONEDNN_MAX_CPU_ISA): what each cap leaves out of the flags that decide the precision
ISA_CAP_WITHOUT = {
    "SSE41": AVX512 | AMX | VNNI | NATIVE_BF16 | {"avx2"},
    "AVX": AVX512 | AMX | VNNI | NATIVE_BF16 | {"avx2"},
    "AVX2": AVX512 | AMX | VNNI | NATIVE_BF16,
    "AVX2_VNNI": AVX512 | AMX,
    "AVX2_VNNI_2": AVX512 | AMX,
    "AVX512_CORE": AMX | VNNI | NATIVE_BF16,
    "AVX512_CORE_VNNI": AMX | NATIVE_BF16,
    "AVX512_CORE_BF16": AMX,
}


def isa_cap() -> str:
    """The cap set on oneDNN's instruction sets (ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA), or ''."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo) less those a cap on oneDNN's instruction sets keeps its
    kernels from using; empty where they cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return flags - ISA_CAP_WITHOUT.get(isa_cap(), frozenset())


def cpu_description() -> str:
    """The CPU's model name, thread count and the instruction sets that decide the network's speed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    flags = cpu_flags()
    held = f" (oneDNN held to {isa_cap()})" if isa_cap() in ISA_CAP_WITHOUT else ""
    return f"{name}, {os.cpu_count()} threads, " + (" ".join(f for f in REPORTED if f in flags) or "no AVX2") + held


def openvino_precision(has_int8: bool, overflow_fix: str | None = "enable",
                       flags: set[str] | None = None, without_vnni: str | None = None) -> tuple[str, str]:
    """The precision `auto` runs on this CPU, and why (for the log): INT8 where the model has an
    INT8 IR and the CPU has VNNI, or has not but the IR cannot saturate (overflow fix on every
    layer) and ran on OpenVINO's AVX2 kernels when converted (`without_vnni`: the manifest's
    check, None where it predates it); else f32."""
    flags = cpu_flags() if flags is None else flags
    vnni = sorted(flags & VNNI)
    if has_int8 and vnni:
        return "int8", f"VNNI: {' '.join(vnni)}"
    if has_int8 and without_vnni not in (None, "ok"):
        return "f32", f"no VNNI, and the INT8 IR {without_vnni} on OpenVINO's AVX2 kernels when converted"
    if has_int8 and overflow_fix == "enable":
        return "int8", "no VNNI; the INT8 IR has the overflow fix on every layer"
    if not has_int8:
        return "f32", "no INT8 IR"
    return "f32", f"no VNNI for an INT8 IR quantised with overflow fix {overflow_fix!r}: it could saturate"
