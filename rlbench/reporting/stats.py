"""Small-sample statistics of a comparison over seeds: intervals that hold at 3–5 seeds, the
problem-level test stratified by seed, a two-way model that pools the seeds' noise, Holm's
adjustment.

* ``interval``: a 95% interval of a mean. Below ``T_BELOW`` values Student's t (scipy): the
  percentile bootstrap of n values cannot reach beyond [min, max] (at n = 3 it returns exactly the
  range, which covers the mean ~75% of the time); from ``T_BELOW`` values on the percentile
  bootstrap. Every interval says which method made it (``method``); an interval of an accuracy is
  cut at [0, 1] (``bounds``; a t interval of 3 seeds near 0.9 reaches past 1).
* ``iqm``: the interquartile mean, only from 4 values up (below that it trims nothing).
* ``sd_interval``: the chi-square interval of a standard deviation: with n − 1 = 2 degrees of
  freedom it spans 0.52×–6.3× the estimate, so a power figure computed from it carries that range.
* ``problem_level``: McNemar's exact test per seed on the two runs' answers to the same problems,
  and a Cochran–Mantel–Haenszel test over (seed, problem) strata (statsmodels' ``StratifiedTable``;
  on paired answers it equals McNemar's χ² on the discordant pairs summed over seeds). Both are
  *conditional on the trained runs*: they measure whether these particular runs answer differently,
  i.e. evaluation noise, not whether the algorithm does — training randomness enters only through
  the seed-level tests.
* ``two_way``: accuracy ~ group + seed by OLS (statsmodels): every algorithm's difference from the
  baseline with a residual variance pooled over all algorithms of the suite (assumption: equal
  variances and additive seed effects), more degrees of freedom than one pair's t-test.
* ``holm``: Holm–Bonferroni adjusted p-values for a family of comparisons (statsmodels).

Not covered: non-normal per-seed differences (nothing can check normality at 3–5 seeds);
heteroscedastic algorithms in the two-way model; dependence between evaluation problems.
"""
from __future__ import annotations

import math

import numpy as np

T_BELOW = 10  # fewer values than this: Student-t intervals; from here on the bootstrap
LEVEL = 0.95


def _clean(values) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))])


def interval_method(n: int) -> str:
    """The method ``interval`` uses for n values."""
    return "none" if n < 2 else ("t" if n < T_BELOW else "bootstrap")


def interval(values, level: float = LEVEL, n_boot: int = 10_000, seed: int = 0,
             bounds: tuple[float | None, float | None] = (None, None)) -> dict:
    """{mean, low, high, n, method} of a mean: Student-t below ``T_BELOW`` values, else the
    percentile bootstrap; one value or none: no interval (NaN bounds, method ``none``).
    ``bounds``: the range the measure can take (an accuracy: (0, 1)); a t interval reaching past
    it is cut there (the mean cannot lie outside it), and ``clipped`` says so."""
    from scipy import stats

    v = _clean(values)
    n = len(v)
    out = {"mean": float(v.mean()) if n else math.nan, "low": math.nan, "high": math.nan, "n": n,
           "method": interval_method(n), "clipped": False}
    if n < 2:
        return out
    if out["method"] == "t":
        sd = float(v.std(ddof=1))
        if sd == 0:
            out["low"] = out["high"] = out["mean"]
        else:
            lo, hi = stats.t.interval(level, n - 1, loc=out["mean"], scale=sd / math.sqrt(n))
            out["low"], out["high"] = float(lo), float(hi)
    else:
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, n, (n_boot, n))].mean(1)
        a = (1 - level) / 2
        out["low"], out["high"] = float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
    lo_bound, hi_bound = bounds
    if lo_bound is not None and out["low"] < lo_bound:
        out["low"], out["clipped"] = float(lo_bound), True
    if hi_bound is not None and out["high"] > hi_bound:
        out["high"], out["clipped"] = float(hi_bound), True
    return out


ACCURACY = (0.0, 1.0)  # the bounds of an accuracy (``interval``'s ``bounds``)
ACCURACY_CHANGE = (-1.0, 1.0)  # of a difference of two accuracies


def iqm(values) -> float:
    """Interquartile mean (the mean after cutting 25% from each end); NaN below 4 values."""
    v = np.sort(_clean(values))
    if len(v) < 4:
        return math.nan
    cut = int(0.25 * len(v))
    return float(v[cut:len(v) - cut].mean())


def prob_improvement(xs, ys) -> float:
    """P(X > Y) + ½P(X = Y) over all pairs (Agarwal et al. 2021)."""
    pairs = [(x, y) for x in _clean(xs) for y in _clean(ys)]
    if not pairs:
        return math.nan
    return sum((x > y) + 0.5 * (x == y) for x, y in pairs) / len(pairs)


def sd_interval(sd: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The chi-square interval of a normal standard deviation estimated from n values."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan, math.nan
    a = (1 - level) / 2
    df = n - 1
    return sd * math.sqrt(df / stats.chi2.ppf(1 - a, df)), sd * math.sqrt(df / stats.chi2.ppf(a, df))


def holm(pvalues) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN stays NaN and is left out of the family)."""
    from statsmodels.stats.multitest import multipletests

    p = [float(x) for x in pvalues]
    idx = [i for i, x in enumerate(p) if math.isfinite(x)]
    out = [math.nan] * len(p)
    if idx:
        adj = multipletests([p[i] for i in idx], method="holm")[1]
        for i, a in zip(idx, adj):
            out[i] = float(a)
    return out


# -- the problem-level test, per seed and stratified ------------------------------------------------

def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (statsmodels)."""
    from statsmodels.stats.contingency_tables import mcnemar

    if b + c == 0:
        return 1.0
    return float(mcnemar([[0, b], [c, 0]], exact=True).pvalue)


def problem_level(per_seed: dict) -> dict:
    """``per_seed``: {seed: (answers of A, answers of B)}, each {problem id: correct}. Returns the
    per-seed McNemar tests (``seeds``: seed, problems, a_only, b_only, p), the pooled discordant
    counts, the CMH test over (seed, problem) strata (``cmh_p``, continuity-corrected) and the
    seed contributing most to the net difference: its own net (``top_seed_net``) and share of the
    total (``top_seed_share``, above 1 when other seeds go the other way)."""
    from statsmodels.stats.contingency_tables import StratifiedTable

    seeds, tables = [], []
    for seed, (a, b) in sorted(per_seed.items()):
        shared = [i for i in a if i in b]
        a_only = sum(1 for i in shared if a[i] and not b[i])
        b_only = sum(1 for i in shared if b[i] and not a[i])
        seeds.append({"seed": seed, "problems": len(shared), "a_only": a_only, "b_only": b_only,
                      "p": mcnemar_exact(a_only, b_only)})
        # one stratum per problem: rows A, B; columns right, wrong (concordant strata carry no information)
        tables += [np.array([[int(bool(a[i])), 1 - int(bool(a[i]))], [int(bool(b[i])), 1 - int(bool(b[i]))]])
                   for i in shared if bool(a[i]) != bool(b[i])]
    b_tot, c_tot = sum(s["a_only"] for s in seeds), sum(s["b_only"] for s in seeds)
    out = {"seeds": seeds, "problems": sum(s["problems"] for s in seeds), "a_only": b_tot, "b_only": c_tot,
           "cmh_p": 1.0, "cmh_statistic": 0.0, "net": b_tot - c_tot, "top_seed": None, "top_seed_net": 0,
           "top_seed_share": math.nan}
    if tables:
        res = StratifiedTable(tables).test_null_odds(correction=True)
        out["cmh_p"], out["cmh_statistic"] = float(res.pvalue), float(res.statistic)
    net = b_tot - c_tot
    if net:
        top = max(seeds, key=lambda s: (s["a_only"] - s["b_only"]) * (1 if net > 0 else -1))
        out["top_seed"], out["top_seed_net"] = top["seed"], top["a_only"] - top["b_only"]
        out["top_seed_share"] = out["top_seed_net"] / net
    return out


# -- the two-way model: algorithm + seed --------------------------------------------------------------

def two_way(rows: list[dict], baseline: str) -> dict | None:
    """OLS of ``value`` on group + seed (``rows``: dicts with group, seed, value; one value per
    group and seed), treatment-coded against ``baseline``. Returns the residual sd and its degrees
    of freedom, and per group: the difference from the baseline, its standard error, t, p; None with
    fewer than 3 groups or 2 seeds, or without residual degrees of freedom."""
    import pandas as pd
    import statsmodels.formula.api as smf

    df = pd.DataFrame(rows).dropna(subset=["value"])
    groups = list(dict.fromkeys(df["group"]))
    if baseline not in groups or len(groups) < 3 or df["seed"].nunique() < 2:
        return None
    df = df.assign(seed=df["seed"].astype(str))
    fit = smf.ols(f"value ~ C(group, Treatment({baseline!r})) + C(seed)", data=df).fit()
    if fit.df_resid < 1:
        return None
    out = {"residual_sd": float(math.sqrt(fit.scale)), "df_resid": int(fit.df_resid), "groups": {}}
    for g in groups:
        if g == baseline:
            continue
        term = f"C(group, Treatment({baseline!r}))[T.{g}]"
        if term not in fit.params:
            continue
        out["groups"][g] = {"diff": float(fit.params[term]), "se": float(fit.bse[term]),
                            "t": float(fit.tvalues[term]), "p": float(fit.pvalues[term])}
    return out
