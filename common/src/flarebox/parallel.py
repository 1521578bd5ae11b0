"""NumPy work split over the CPU's cores by threads (NumPy's loops, gathers and copies release
the GIL). One shared pool: the stages that use it run one after another."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

THREADS = max(1, min(os.cpu_count() or 1, 4))
_POOL = ThreadPoolExecutor(THREADS, "flarebox-numpy")


def over_slices(work: Callable[[slice], None], length: int) -> None:
    """work(part) for contiguous parts of range(length), one per thread, in parallel; the parts
    must write disjoint outputs."""
    bounds = [length * i // THREADS for i in range(THREADS + 1)]
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if len(parts) <= 1:
        for part in parts:
            work(part)
        return
    for future in [_POOL.submit(work, part) for part in parts]:
        future.result()
