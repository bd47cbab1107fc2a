"""The whole ``default`` leaderboard, cold vs warm (issue 10, deliverable 4.6): wall time of
``fedbench run --preset default`` with an empty feature cache and fresh results, then again with the
cache it left (fresh results again, so every row runs). The ratio is cold / warm.

It takes about an hour on a 2-core CPU, so it runs only with ``FEDBENCH_BENCH_DEFAULT=1``:
``FEDBENCH_BENCH_DEFAULT=1 pytest benchmarks/test_bench_default.py --benchmark-enable -s``. Otherwise
(and under ``--benchmark-disable``) it runs the ``smoke`` preset's first row the same two ways, only to
check that the measurement works. Nothing asserts a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

FULL = os.environ.get("FEDBENCH_BENCH_DEFAULT") == "1"


def _run(args: list[str], results: Path, cache: Path) -> float:
    env = {**os.environ, "FEDBENCH_CACHE": str(cache)}
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "from fedbench.cli import app; app()", "run", *args, "--results", str(results)],
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def test_default_leaderboard_cold_vs_warm(benchmark, tmp_path):
    args = ["--preset", "default", "--no-plots"] if FULL else ["--preset", "smoke", "--methods", "pilot-ctmoa"]
    if not FULL:
        args += ["--rounds", "1", "--no-plots"]
    cache = tmp_path / "cache"
    cold = _run(args, tmp_path / "cold", cache)
    warm = _run(args, tmp_path / "warm", cache)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    what = "default" if FULL else "smoke (pilot-ctmoa, 1 round; FEDBENCH_BENCH_DEFAULT=1 for default)"
    benchmark.extra_info.update({"preset": what, "cold_s": cold, "warm_s": warm, "ratio": cold / warm})
    print(f"\n{what}: cold {cold:.1f} s, warm {warm:.1f} s, cold / warm = {cold / warm:.2f}")
