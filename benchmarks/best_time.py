"""The one timing rule of the benchmarks' baselines: the best of a few wall-clock runs (of each side
in turn, when two are compared, so that load on a shared machine falls on both alike)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def best_seconds(fn: Callable[[], object], repeat: int = 5) -> float:
    """The shortest of ``repeat`` wall-clock timings of ``fn()`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_seconds_interleaved(fns: Sequence[Callable[[], object]], repeat: int = 5) -> list[float]:
    """For each of ``fns``, the shortest of ``repeat`` wall-clock timings, the functions run in turn
    (a, b, a, b, ...) so that neither side gets all of a quiet or a busy stretch of the machine."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best
