"""rlbench/reporting/compare.py: saturating fits recover known curves, refuse unidentifiable ones; the power
numbers of a paired comparison against a hand-computed t-test and the noncentral t distribution."""
import math

import numpy as np
import pytest
from scipy import stats

from rlbench.reporting import compare


def _power(effect, n, alpha=0.05):
    """Two-sided one-sample t-test power at Cohen's d_z ``effect`` with n differences (noncentral t)."""
    df, nc = n - 1, effect * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


def test_fit_recovers_a_known_curve_within_five_percent():
    A, B, C_mid, R0 = 0.72, 1.6, 3e14, 0.2
    C = np.concatenate([[0.0], np.logspace(13, 16, 12)])
    rng = np.random.default_rng(0)
    curves = [compare.saturating(C, A, B, C_mid, R0) + rng.normal(0, 0.01, len(C)) for _ in range(10)]
    fit = compare.bootstrap_fit(C, curves, n=100)
    assert fit["identifiable"], fit["why"]
    assert fit["interval"] == "bootstrap"  # 10 seeds: the seed bootstrap is valid
    assert fit["A"] == pytest.approx(A, rel=0.05)
    assert fit["B"] == pytest.approx(B, rel=0.05)
    assert fit["C_mid"] == pytest.approx(C_mid, rel=0.05)
    assert fit["A_ci"][0] <= fit["A"] <= fit["A_ci"][1]
    # the points alone, without the bootstrap, give the same answer
    direct = compare.fit_saturating(C, np.mean(curves, 0), float(np.mean(curves, 0)[0]))
    assert direct["A"] == pytest.approx(fit["A"]) and direct["rmse"] < 0.01
    # 4 seeds: the same point fit, no interval (4 seeds give at most 35 distinct resampled mean curves)
    few = compare.bootstrap_fit(C, curves[:4], n=100)
    assert few["identifiable"] and "A_ci" not in few and few["interval"].startswith("none: 4 seeds")
    assert few["A"] == pytest.approx(A, rel=0.05)


def test_flat_and_two_point_curves_are_not_identifiable():
    C = np.array([0.0, 1e14, 2e14, 4e14, 8e14])
    rng = np.random.default_rng(1)
    flat = [0.4 + rng.normal(0, 0.003, len(C)) for _ in range(3)]
    fit = compare.bootstrap_fit(C, flat)
    assert not fit["identifiable"] and fit["why"].startswith("flat")
    two = compare.bootstrap_fit([0.0, 1e15], [[0.2, 0.5], [0.25, 0.55]])
    assert not two["identifiable"] and "only 1 point" in two["why"]
    # still rising linearly at the end of the budget: half of the gain lies beyond it
    C2 = np.array([0.0, 1e13, 2e13, 3e13, 4e13])
    linear = [[0.2, 0.25, 0.3, 0.35, 0.4], [0.2, 0.26, 0.31, 0.36, 0.41]]
    fit = compare.bootstrap_fit(C2, linear, n=50)
    assert not fit["identifiable"] and fit["why"].startswith("the points do not resolve the curve")
    # a good curve from one seed: no interval, so no numbers
    one = [compare.saturating(C, 0.7, 1.5, 2e14, 0.2)]
    fit = compare.bootstrap_fit(C, one, n=50)
    assert not fit["identifiable"] and fit["why"].startswith("a single seed")
    # rising, but the seeds disagree wildly: the intervals span the whole range
    noisy = [[0.2, 0.9, 0.2, 0.9, 0.2], [0.2, 0.2, 0.9, 0.2, 0.9], [0.2, 0.5, 0.5, 0.9, 0.3]] * 4
    fit = compare.bootstrap_fit(C, noisy, n=100)
    assert not fit["identifiable"] and fit["why"]


def test_power_numbers_match_a_hand_computed_paired_t_test():
    base = np.array([0.40, 0.42, 0.45, 0.38, 0.41])
    algo = base + np.array([0.03, 0.05, -0.01, 0.04, 0.02])
    rec = compare.paired_power(algo - base, mde=0.02)
    # by hand: mean 0.026, squared deviations sum to 2.12e-3, sd = sqrt(2.12e-3 / 4), t = mean / (sd / √5)
    sd = math.sqrt(2.12e-3 / 4)
    assert rec["mean_diff"] == pytest.approx(0.026)
    assert rec["sd_diff"] == pytest.approx(sd)
    assert rec["t"] == pytest.approx(0.026 / (sd / math.sqrt(5)))
    assert rec["p"] == pytest.approx(stats.ttest_rel(algo, base).pvalue)
    assert rec["p"] == pytest.approx(2 * stats.t.sf(0.026 / (sd / math.sqrt(5)), 4))
    # the minimum detectable difference has power 0.8 at n = 5 (noncentral t, not statsmodels)
    assert _power(rec["mdd"] / sd, 5) == pytest.approx(0.8, abs=1e-4)
    # seeds needed: the smallest n with power ≥ 0.8
    n = int(rec["seeds_for_mde"])
    assert _power(0.02 / sd, n) >= 0.8 > _power(0.02 / sd, n - 1)
    assert rec["p"] == pytest.approx(0.06499, abs=1e-4)  # t = 2.525 on 4 df: not significant at 0.05
    sentence = compare.power_sentence("dr_grpo", "grpo", rec)
    assert sentence.startswith("dr_grpo vs grpo: +0.026 over 5 paired seeds (p = 0.065) — not significant")
    clear = compare.paired_power([0.03, 0.05, 0.01, 0.04, 0.02])
    assert clear["p"] == pytest.approx(stats.ttest_1samp([0.03, 0.05, 0.01, 0.04, 0.02], 0).pvalue) and clear["p"] < 0.05
    assert compare.power_sentence("dr_grpo", "grpo", clear).endswith("— significant.")


def test_power_sentence_says_how_underpowered():
    rec = compare.paired_power([0.02, -0.03, 0.04], mde=0.05)
    assert rec["p"] > 0.05
    s = compare.power_sentence("cispo", "grpo", rec)
    assert "not significant" in s and f"±{rec['mdd']:.3f}" in s and f"about {int(rec['seeds_for_mde'])} seeds" in s
    assert _power(rec["mdd"] / rec["sd_diff"], 3) == pytest.approx(0.8, abs=1e-4)
    assert compare.paired_power([0.1])["p"] != compare.paired_power([0.1])["p"]  # NaN: one seed has no test
    assert "no test possible" in compare.power_sentence("a", "b", compare.paired_power([0.1]))


def test_no_spread_between_seeds_gives_no_test_rather_than_a_false_certainty():
    rec = compare.paired_power([0.0, 0.0, 0.0])
    assert rec["sd_diff"] == 0 and rec["p"] != rec["p"] and rec["mdd"] != rec["mdd"]  # NaN, not 0
    assert "no spread between seeds" in compare.power_sentence("a", "b", rec)
