"""scripts/power.py: the seeds a family of comparisons needs, from a pooled variance of per-seed
paired differences, with t quantiles and a chi-square range."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedbench.config import toml_file

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fedbench_power_script", ROOT / "scripts" / "power.py")
assert _spec is not None and _spec.loader is not None
power = importlib.util.module_from_spec(_spec)
sys.modules["fedbench_power_script"] = power  # dataclasses look their module up
_spec.loader.exec_module(power)


def _direct(var: float, target: float) -> int:
    """Smallest n >= 2 with t(n - 1, 0.975) * sqrt(var / n) <= target, counting from 2."""
    n = 2
    while stats.t.ppf(0.975, n - 1) * math.sqrt(var / n) > target:
        n += 1
    return n


@pytest.mark.parametrize("var", [0.0, 1e-6, 5e-5, 3.46e-4, 2e-3])
def test_seeds_needed_is_the_smallest_n_with_a_t_half_width_under_target(var):
    assert power.seeds_needed(var, 0.01) == _direct(var, 0.01)


def test_family_power_on_synthetic_differences_of_known_variance():
    rng = np.random.default_rng(0)
    sigma2, within, k, pairs, target = 3e-4, 1e-4, 5, 40, 0.01
    diffs = [rng.normal(0.01, math.sqrt(sigma2), size=k) for _ in range(pairs)]
    fam = power.family_power(diffs, [within] * pairs, target)
    pooled = float(np.mean([d.var(ddof=1) for d in diffs]))
    assert fam.var == pytest.approx(pooled)
    assert fam.df == fam.df_upper == pairs * (k - 1)  # independent pairs: every df counts
    assert fam.var_lo < sigma2 < fam.var_hi  # the chi-square interval covers the true variance
    n, lo, hi = fam.need[1.0]
    assert n == _direct(pooled, target)
    assert lo <= n <= hi and lo <= _direct(sigma2, target) <= hi
    assert (lo, hi) == (_direct(fam.var_lo, target), _direct(fam.var_hi, target))
    n_inf, lo_inf, hi_inf = fam.need[math.inf]  # unlimited test examples: only the seed part is left
    assert n_inf == _direct(pooled - within, target) and lo_inf <= n_inf <= hi_inf
    assert lo_inf <= _direct(sigma2 - within, target) <= hi_inf and n_inf <= n
    # dependent pairs: a smaller df widens the range around the same estimate
    narrow = power.family_power(diffs, [within] * pairs, target, independent=4)
    assert narrow.df == 16 and narrow.need[1.0][0] == n
    assert narrow.need[1.0][1] <= lo and narrow.need[1.0][2] >= hi


def test_families_follow_the_router_ladder_of_the_results_readme():
    labels = [m.label for m in toml_file.load("routing-frozen").methods]
    a, b, c, d, e, f, g, h, oracle, uniform = labels
    fams = power.families(labels)
    ladder, bounds, different, same = fams.values()
    assert ladder == [(b, a), (c, b), (d, c), (e, d), (f, e), (g, f), (h, b)]
    assert bounds == [(oracle, uniform), (oracle, a), (uniform, a)]
    assert different == [(a, x) for x in (c, d, e, f, g, h)]  # pilot-ctmoa vs mmrouter-moa, not above
    assert len(ladder) + len(bounds) + len(different) + len(same) == math.comb(len(labels), 2)
    assert power.independent_pairs(ladder) == 7 and power.independent_pairs(bounds) == 2
    assert power.parse_label(h) == (
        "mmrouter-moa",
        {"ocr_expert": "false", "router_inputs": "image", "router_scope": "local", "router_view": "prompt"},
    )


def test_report_on_committed_results():
    results = ROOT / "results" / "routing-frozen" / "domain_task_coupling=0.5"
    if not results.is_dir():
        pytest.skip("committed results not in this checkout")
    text = power.report(results, 0.01)
    seeds = len({p.name.split("__seed")[1].split("__")[0] for p in (results / "runs").iterdir()})
    t = stats.t.ppf(0.975, seeds - 1)
    assert f"10 rows, 45 pairs, {seeds} seeds (t({seeds - 1}, 0.975) = {t:.3f})" in text
    for name in power.FAMILIES:
        assert f"\n{name}: " in text
    assert "left out, identical on every seed: mmrouter-moa[…image,router_scope=local] − pilot-ctmoa" in text
