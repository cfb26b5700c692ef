"""Statistical power of a paired comparison (per-seed differences, algorithm − baseline): the
power of the two-sided one-sample t-test on n differences at Cohen's d_z (statsmodels'
``TTestPower``), the seeds needed to reach a power, the d_z detectable with n seeds. Shared by the
report (rlbench/reporting/compare.py) and the suite plan (rlbench/suites/plan.py), before any run.
"""
from __future__ import annotations

import math

ALPHA, POWER = 0.05, 0.8


def t_power(effect: float, n: int, alpha: float) -> float:
    """Power of the two-sided one-sample t-test on n differences at Cohen's d_z ``effect`` (statsmodels)."""
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().power(effect_size=abs(effect), nobs=n, alpha=alpha, alternative="two-sided"))


def seeds_needed(effect: float, alpha: float, power: float, cap: int = 1_000_000) -> float:
    """The fewest seeds (paired differences, ≥ 2) whose t-test reaches ``power`` at ``effect``; inf
    beyond ``cap``. Power grows with n, so a doubling search then bisection finds it exactly."""
    if effect == 0 or not math.isfinite(effect):
        return math.inf if effect == 0 else 2.0
    lo, hi = 1, 2  # power(lo) < target <= power(hi), with n = 1 counting as no power
    while t_power(effect, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > cap:
            return math.inf
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if t_power(effect, mid, alpha) < power else (lo, mid)
    return float(hi)


def detectable(n: int, alpha: float, power: float) -> float:
    """The d_z that the t-test on n differences detects with ``power`` (bisection on statsmodels' power)."""
    lo, hi = 0.0, 1.0
    while t_power(hi, n, alpha) < power:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_power(mid, n, alpha) < power else (lo, mid)
    return hi
