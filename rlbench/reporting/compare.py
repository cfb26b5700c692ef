"""Statistics that turn a comparison into an answer: how sure are we, and at what compute?

* ``paired_power``: a paired t-test of per-seed differences (algorithm − baseline, matched by
  seed), the minimum detectable difference at the present number of seeds (two-sided α = 0.05,
  power 0.8, from the observed spread of the differences) and the seeds needed to detect a
  user-set difference (``--mde``) — each with the range implied by the chi-square interval of the
  spread (with 3 seeds the sd is known only to 0.52×–6.3×, so "49 seeds" is really 15–1,850).
  The t-test is scipy's, the power function statsmodels' ``TTestPower`` (one-sample t on the
  differences; Cohen's d_z = mean / sd), inverted by bisection (its own ``solve_power`` returns NaN
  when its root finder fails, as it does for small effects). No "seeds for the observed
  difference": that is post-hoc power, a restatement of p.
* ``seed_comparisons`` / ``answer_paragraph``: the per-pair tests with Holm-adjusted p-values
  beside the raw ones, and with ≥ 3 algorithms the two-way model (rlbench/reporting/stats.py) that pools the
  residual variance of all algorithms of the suite.
* ``fit_saturating``: ScaleRL's accuracy-vs-compute curve (Khatri et al. 2025, arXiv 2510.13786),
  R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B), with R0 the accuracy before training (C = 0)
  held fixed, A the asymptote, B the efficiency (steepness), C_mid the compute at half of the
  gain; fitted by scipy's bounded least squares (``curve_fit``, trust-region reflective) in
  log C_mid. ``bootstrap_fit`` gives percentile intervals from seed resamples only where the
  bootstrap is valid (``stats.T_BELOW`` seeds or more; with 3 seeds it would redraw from at most
  10 distinct mean curves) and says in words when the points cannot identify the curve.

Not covered: the power analysis assumes normally distributed per-seed differences (with 3–5
seeds nothing can check that); the fit's intervals are over seeds only, not over evaluation
problems.
"""
from __future__ import annotations

import math

import numpy as np

from rlbench.power import ALPHA, POWER, detectable, seeds_needed


# -- statistical power of a paired comparison ----------------------------------------------------

def paired_power(diffs, alpha: float = ALPHA, power: float = POWER, mde: float | None = None) -> dict:
    """Paired per-seed differences → mean, sd (with its chi-square interval), t, p, the minimum
    detectable difference and the seeds needed for ``mde``, each with the range the sd's interval implies."""
    from scipy import stats as sps

    from rlbench.reporting import stats

    d = np.asarray([x for x in diffs if x is not None and math.isfinite(x)], dtype=float)
    n = len(d)
    nan = math.nan
    out = {"n": n, "mean_diff": float(d.mean()) if n else nan, "sd_diff": nan, "sd_low": nan, "sd_high": nan,
           "t": nan, "p": nan, "mdd": nan, "mdd_low": nan, "mdd_high": nan, "seeds_for_mde": nan,
           "seeds_for_mde_low": nan, "seeds_for_mde_high": nan, "mde": mde, "alpha": alpha, "power": power}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    out["sd_diff"] = sd
    if sd == 0:  # every seed moved by exactly the same amount: no spread to test or size against
        return out
    out["sd_low"], out["sd_high"] = stats.sd_interval(sd, n)
    res = sps.ttest_1samp(d, 0.0)
    out["t"], out["p"] = float(res.statistic), float(res.pvalue)
    dz = detectable(n, alpha, power)
    out["mdd"], out["mdd_low"], out["mdd_high"] = dz * sd, dz * out["sd_low"], dz * out["sd_high"]
    if mde:
        out["seeds_for_mde"] = seeds_needed(mde / sd, alpha, power)
        out["seeds_for_mde_low"] = seeds_needed(mde / out["sd_low"], alpha, power)
        out["seeds_for_mde_high"] = seeds_needed(mde / out["sd_high"], alpha, power)
    return out


def _seeds(need: float) -> str:
    return f"{int(need)}" if math.isfinite(need) else "more than is practical"


def power_sentence(name: str, baseline: str, rec: dict) -> str:
    """One plain-words sentence on a comparison's significance and power."""
    n, m = rec["n"], rec["mean_diff"]
    if n < 2:
        return f"{name} vs {baseline}: {n} paired seed(s), no test possible (needs ≥ 2)."
    if rec["sd_diff"] == 0:
        return (f"{name} vs {baseline}: {m:+.3f} on each of {n} paired seeds, no spread between seeds, so no "
                f"t-test or power estimate (more seeds or more evaluation problems would give one).")
    holm = f", Holm-adjusted {rec['p_holm']:.3g}" if math.isfinite(rec.get("p_holm", math.nan)) else ""
    head = f"{name} vs {baseline}: {m:+.3f} over {n} paired seeds (p = {rec['p']:.3g}{holm})"
    if rec["p"] < rec["alpha"] and not rec.get("p_holm", 0) >= rec["alpha"]:
        return head + " — significant."
    if rec["p"] < rec["alpha"]:
        return head + " — significant alone, not after Holm's adjustment for the suite's comparisons."
    s = (f"{head} — not significant; with {n} seeds only differences of about ±{rec['mdd']:.3f} "
         f"(±{rec['mdd_low']:.3f} to ±{rec['mdd_high']:.3f}, the 95% range of the seeds' spread) or more are "
         f"detectable (power {rec['power']:.0%})")
    if rec.get("mde"):
        s += (f"; a difference of {rec['mde']:.3f} would need about {_seeds(rec['seeds_for_mde'])} seeds "
              f"({_seeds(rec['seeds_for_mde_low'])} to {_seeds(rec['seeds_for_mde_high'])})")
    return s + "."


# -- saturating accuracy-vs-compute fits -----------------------------------------------------------

def saturating(C, A: float, B: float, C_mid: float, R0: float):
    """R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B); R(0) = R0."""
    C = np.asarray(C, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        frac = 1.0 / (1.0 + np.power(C_mid / np.where(C > 0, C, np.nan), B))
    return R0 + (A - R0) * np.nan_to_num(frac, nan=0.0)


def fit_saturating(C, R, R0: float) -> dict | None:
    """Least-squares A, B, C_mid on the points with C > 0 (R0 fixed); None when the fit fails."""
    from scipy.optimize import curve_fit

    C, R = np.asarray(C, dtype=float), np.asarray(R, dtype=float)
    keep = C > 0
    C, R = C[keep], R[keep]
    if len(C) < 3:
        return None
    lo_c, hi_c = math.log(C.min()) - 3.0, math.log(C.max()) + 3.0  # C_mid within e³ of the observed range

    def f(c, A, B, log_cmid):
        return saturating(c, A, B, math.exp(log_cmid), R0)

    A0 = float(min(1.0, max(R.max(), R0 + 1e-3)))
    p0 = [A0, 1.0, float(np.log(np.median(C)))]
    try:
        (A, B, lc), _ = curve_fit(f, C, R, p0=p0, bounds=([0.0, 0.05, lo_c], [1.0, 10.0, hi_c]), maxfev=20_000)
    except (RuntimeError, ValueError):
        return None
    return {"A": float(A), "B": float(B), "C_mid": float(math.exp(lc)), "R0": float(R0),
            "rmse": float(np.sqrt(np.mean((f(C, A, B, lc) - R) ** 2)))}


def bootstrap_fit(C, curves, n: int = 200, seed: int = 0, flat: float = 0.02) -> dict:
    """Fit the mean curve over seeds (``curves``: [seeds][points] accuracies at compute ``C``,
    C[0] = 0 gives R0) and, from ``stats.T_BELOW`` seeds on, refit on ``n`` seed resamples for
    percentile intervals (below that the point fit comes without an interval, ``interval`` says why). ``identifiable`` is False, with the
    reason in ``why``, when fewer than 3 points have C > 0, the mean curve moves by less than
    ``flat`` over the budget, the fit fails, the curve does not bend inside the budget (A or B at
    the fit's bounds, or C_mid beyond the largest compute: the asymptote would be extrapolated),
    there is a single seed, or (with intervals) a 95% interval spans more than the parameter's range or reaches its
    bound (A: the unit interval, B: 0.05–10, C_mid: beyond the observed compute)."""
    C = np.asarray(C, dtype=float)
    Y = np.asarray(curves, dtype=float)  # [S, P]
    out: dict = {"identifiable": False, "why": None, "points": int((C > 0).sum()), "seeds": int(Y.shape[0])}
    if (C > 0).sum() < 3:
        out["why"] = f"only {(C > 0).sum()} point(s) after the start; the curve has 3 parameters"
        return out
    def start(curve) -> float:  # R0: the accuracy at C = 0, else the lowest point
        return float(curve[0]) if C[0] == 0 else float(curve.min())

    mean = Y.mean(0)
    R0 = start(mean)
    if float(mean.max() - mean.min()) < flat:
        out["why"] = f"flat: the mean accuracy moves by {mean.max() - mean.min():.3f} (< {flat}) over the budget"
        return out
    point = fit_saturating(C, mean, R0)
    if point is None:
        out["why"] = "the least-squares fit did not converge"
        return out
    out.update(point)
    pos = C[C > 0]
    bounds = [k for k, hit in (("A", point["A"] >= 1 - 1e-3), ("B", not 0.05 * 1.01 < point["B"] < 10 * 0.99))
              if hit]
    if bounds or point["C_mid"] > pos.max():
        out["why"] = ("the points do not resolve the curve: " +
                      (f"{' and '.join(bounds)} at the fit's bound (" + ("B at its upper bound: the gain comes as a "
                       "jump between two evaluations, so evaluate earlier in the budget"
                       if "B" in bounds and point["B"] > 1 else "no bend inside the budget") + ")" if bounds else
                       f"half of the gain is not reached by the largest compute ({pos.max():.3g}), so the "
                       "asymptote would be an extrapolation"))
        return out
    if Y.shape[0] < 2:
        out["why"] = "a single seed: no interval over seeds to tell the fit from noise"
        return out
    from rlbench.reporting.stats import T_BELOW

    if Y.shape[0] < T_BELOW:  # resamples of 3 seeds are at most 10 distinct mean curves: no valid interval
        out["identifiable"] = True
        out["interval"] = f"none: {Y.shape[0]} seeds (the seed bootstrap needs ≥ {T_BELOW})"
        return out
    out["interval"] = "bootstrap"
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n):
        pick = rng.integers(0, Y.shape[0], Y.shape[0])
        m = Y[pick].mean(0)
        fb = fit_saturating(C, m, start(m))
        if fb is not None:
            boots.append(fb)
    if len(boots) < n // 2:
        out["why"] = f"only {len(boots)} of {n} bootstrap refits converged"
        return out
    for k in ("A", "B", "C_mid"):
        vals = np.array([b[k] for b in boots])
        out[f"{k}_ci"] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]
    spans = {"A": (out["A_ci"][1] - out["A_ci"][0]) >= 1.0 or out["A_ci"][1] >= 1 - 1e-3,
             "B": out["B_ci"][0] <= 0.05 * 1.01 or out["B_ci"][1] >= 10 * 0.99,
             "C_mid": out["C_mid_ci"][0] < pos.min() / math.e or out["C_mid_ci"][1] > pos.max() * math.e}
    wide = [k for k, v in spans.items() if v]
    if wide:
        out["why"] = (f"the seeds disagree too much: the 95% interval of {', '.join(wide)} spans "
                      f"{'to the bound of its range' if wide != ['C_mid'] else 'beyond the observed compute'}")
        return out
    out["identifiable"] = True
    return out


def seed_comparisons(summary, baseline: str, metric: str = "accuracy_after", mde: float | None = None) -> list[dict]:
    """Per task × algorithm group: ``paired_power`` of ``metric`` against ``baseline``, runs matched by
    seed (a report's summary table: columns task, algorithm, seed, ``metric``); Holm-adjusted p-values
    over each task's comparisons."""
    from rlbench.reporting import stats

    rows = []
    for (task, algo), g in summary.groupby(["task", "algorithm"], sort=False):
        if algo == baseline:
            continue
        base = summary[(summary["task"] == task) & (summary["algorithm"] == baseline)]
        by_seed = {s: v for s, v in zip(base["seed"], base[metric]) if v is not None and v == v}
        diffs = [v - by_seed[s] for s, v in zip(g["seed"], g[metric]) if s in by_seed and v is not None and v == v]
        rows.append({"task": task, "algorithm": algo, "rec": paired_power(diffs, mde=mde)})
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        for r, adj in zip(mine, stats.holm([r["rec"]["p"] for r in mine])):
            r["rec"]["p_holm"] = adj
    out = []
    for r in rows:
        rec = r["rec"]
        if rec["n"] < 2 or rec["sd_diff"] == 0:
            answer = "no test"
        elif rec["p"] < rec["alpha"] and not rec["p_holm"] >= rec["alpha"]:
            answer = "significant"
        elif rec["p"] < rec["alpha"]:
            answer = "not significant after Holm"
        else:
            answer = "not significant"
        out.append({"task": r["task"], "algorithm": r["algorithm"], "baseline": baseline, "paired_seeds": rec["n"],
                    "mean_diff": rec["mean_diff"], "sd_diff": rec["sd_diff"], "sd_low": rec["sd_low"],
                    "sd_high": rec["sd_high"], "t_test_p": rec["p"], "p_holm": rec["p_holm"],
                    "min_detectable_diff": rec["mdd"], "mdd_low": rec["mdd_low"], "mdd_high": rec["mdd_high"],
                    **({f"seeds_for_{mde:g}": rec["seeds_for_mde"], f"seeds_for_{mde:g}_low": rec["seeds_for_mde_low"],
                        f"seeds_for_{mde:g}_high": rec["seeds_for_mde_high"]} if mde else {}),
                    "answer": answer, "sentence": power_sentence(f"{r['algorithm']} ({r['task']})", baseline, rec)})
    return out


def two_way_rows(summary, baseline: str, metric: str = "accuracy_after") -> list[dict]:
    """Per task with ≥ 3 algorithm groups: the two-way model's differences from ``baseline``
    (rlbench/reporting/stats.py), with Holm-adjusted p-values over the task's comparisons."""
    from rlbench.reporting import stats

    out = []
    for task, g in summary.groupby("task", sort=False):
        res = stats.two_way([{"group": a, "seed": s, "value": v} for a, s, v in zip(g["algorithm"], g["seed"], g[metric])
                             if v is not None and v == v], baseline)
        if res is None:
            continue
        names = list(res["groups"])
        adj = stats.holm([res["groups"][a]["p"] for a in names])
        for a, h in zip(names, adj):
            r = res["groups"][a]
            out.append({"task": task, "algorithm": a, "baseline": baseline, "diff": r["diff"], "se": r["se"],
                        "t": r["t"], "p": r["p"], "p_holm": h, "residual_sd": res["residual_sd"],
                        "df_resid": res["df_resid"]})
    return out


def answer_paragraph(power: list[dict], baseline: str, two_way: list[dict] = (), problem: list[dict] = (),
                     regressed: list[str] = ()) -> str:
    """The report's first paragraph: which comparisons are significant (per pair, and in the two-way
    model where there is one), what is detectable at these seed counts, how the problem-level test
    relates to the seed-level one, and which runs regressed."""
    sig = [r["algorithm"] for r in power if r["answer"] == "significant"]
    nots = [r for r in power if r["answer"].startswith("not significant")]
    parts = [f"Against `{baseline}` (final held-out accuracy, seeds paired, Holm-adjusted over the suite's "
             "comparisons): " + (f"significant for {', '.join(sig)}" if sig else "no comparison is significant at α = 0.05")
             + ("; " if nots else ".")]
    if nots:
        lo = min(r["min_detectable_diff"] for r in nots)
        hi = max(r["min_detectable_diff"] for r in nots)
        span = f"±{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"±{lo:.3f} to ±{hi:.3f}"
        parts.append(f"not significant for {', '.join(r['algorithm'] for r in nots)} — at these seed counts only "
                     f"differences of about {span} or more are detectable (each line below gives the range that "
                     "the uncertainty of the seeds' spread implies), so a smaller true difference can be neither "
                     "shown nor ruled out.")
    untested = [r["algorithm"] for r in power if r["answer"] == "no test"]
    if untested:
        parts.append(f" No test (fewer than 2 paired seeds, or the same difference on every seed): {', '.join(untested)}.")
    if two_way:
        sig2 = [r["algorithm"] for r in two_way if r["p_holm"] < ALPHA]
        parts.append(f" The two-way model (algorithm + seed, residual variance pooled over all algorithms: "
                     f"sd {two_way[0]['residual_sd']:.3f} on {two_way[0]['df_resid']} degrees of freedom; it assumes "
                     "equal variances) finds " + (f"a significant difference for {', '.join(sig2)}." if sig2
                                                  else "no significant difference either."))
    for pr in problem:
        if pr["cmh_p"] < ALPHA:
            share = (f"; of the net {pr['net']:+d} problems, seed {pr['top_seed']} alone contributes "
                     f"{pr['top_seed_net']:+d}" if pr["top_seed"] is not None else "")
            seed_p = next((r["t_test_p"] for r in power if r["algorithm"] == pr["algorithm"] and r["task"] == pr["task"]),
                          math.nan)
            seed = f"p = {seed_p:.2g}" if math.isfinite(seed_p) else "no test yet: fewer than 2 paired seeds"
            parts.append(f" {pr['algorithm']} answers the same problems differently from {baseline} in these runs "
                         f"(stratified McNemar p = {pr['cmh_p']:.2g}{share}), a test conditional on the trained runs "
                         f"(evaluation noise only); whether the algorithm does so is the seed-level test's question "
                         f"({seed}).")
    if regressed:
        parts.append(f" Regressed runs (final accuracy more than 2 standard errors below their own peak: training "
                     f"instability, not evaluation noise): {', '.join(regressed)}.")
    return "".join(parts)
