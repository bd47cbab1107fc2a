"""The one timing rule of the benchmarks' baselines: the best of a few wall-clock runs."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds(fn: Callable[[], object], repeat: int = 5) -> float:
    """The shortest of ``repeat`` wall-clock timings of ``fn()`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
