"""Accuracy against compute: the report's curves, tables and fits on a shared compute axis.

A run with ``eval.at_budget_fractions`` evaluates when the spent share of its budget first
reaches each fraction (rlbench/training/trainer.py); each eval record carries what was spent by then
(``budget_fraction``: the actual share; ``spent``: FLOPs, generated tokens; ``time_spent``:
device-seconds, training wall seconds). A step is indivisible, so an algorithm whose steps are
costly (PPO's critic: about twice a GRPO step) reaches several nominal fractions in one step.
Here every comparison uses what was actually spent:

* each nominal fraction f of a run is matched to the run's evaluation whose actual fraction is
  nearest to f (``fraction_actual``); one more than half a step's cost away from f is flagged
  (``off_fraction``; not 0 or 1: every run ends past its budget by up to one step, by the stopping
  rule), and an algorithm whose runs took fewer steps than there are fractions gets a
  warning (the budget is too coarse for its step);
* the curve per algorithm group × task: held-out accuracy at each nominal fraction, mean and a
  95% interval over seeds (``rlbench.reporting.stats.interval``: Student t below 10 seeds), placed at the
  mean actual compute on the chosen axis (``--x flops|tokens|device_hours|wall_seconds``);
* the normalised area under each run's curve over its *actual* fractions (its distinct
  evaluations; the trapezoid divided by the span: the mean accuracy over the budget);
* paired differences against the baseline at each fraction (runs matched by seed): mean, t
  interval, scipy's paired t-test, and both sides' actual fractions;
* ScaleRL's saturating fit (rlbench.reporting.compare.bootstrap_fit) drawn over the points, or the reason
  the points cannot identify it, in words.

Not covered: runs without ``eval.at_budget_fractions`` (their step-wise evals are not on a shared
axis and are left out here); interpolation between evaluations.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rlbench.reporting import compare

AXES = {  # --x: (key of the eval record's "spent", scale, axis label)
    "flops": ("flops", 1.0, "FLOPs (nominal, every pass counted)"),
    "tokens": ("tokens", 1.0, "generated tokens"),
    "device_hours": ("device_seconds", 1 / 3600, "device-hours (training phases)"),
    "wall_seconds": ("wall_seconds", 1.0, "training wall seconds"),
}


def run_points(run: dict, x: str) -> dict[float, dict]:
    """{nominal fraction: the run's evaluation nearest to it} with keys ``actual`` (the fraction
    spent), ``compute`` (on axis ``x``), ``accuracy``, ``off`` (more than half a step's cost from
    the nominal fraction)."""
    key, scale, _ = AXES[x]
    evals = [e for e in run["evals"] if "budget_fraction" in e or e.get("budget_fractions")]
    if not evals:
        return {}
    nominal = sorted({float(f) for e in evals for f in e.get("budget_fractions") or []})
    pts = []
    for i, e in enumerate(evals):  # records without the actual share (older runs): their largest tagged fraction
        spent = {**(e.get("spent") or {}), **(e.get("time_spent") or {})}
        actual = float(e.get("budget_fraction", max(e.get("budget_fractions") or [0.0])))
        pts.append({"step": e.get("step", i), "actual": actual, "compute": float(spent.get(key, 0.0)) * scale,
                    "accuracy": float(e["accuracy"])})
    last = max(pts, key=lambda p: p["step"])
    per_step = last["actual"] / last["step"] if last["step"] else 0.0  # the budget share of one step
    out = {}
    for f in nominal:
        best = min(pts, key=lambda p: (abs(p["actual"] - f), p["step"]))
        # the start and the end are exempt: a run stops after the step that reaches its budget, so its
        # end lies past 1 by up to one step for every algorithm alike
        out[f] = {**best, "off": 0 < f < 1 and abs(best["actual"] - f) > 0.5 * per_step + 1e-9, "per_step": per_step}
    return out


def _auc(evals: list[dict]) -> float:
    """Trapezoid over the run's distinct evaluations on the actual-fraction axis, divided by its span."""
    pts = sorted({(p["actual"], p["accuracy"]) for p in evals})
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return math.nan
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def build(runs: list[dict], baseline: str, x: str = "flops") -> dict | None:
    """Curve, AUC, paired-difference and fit tables (lists of dicts) of the runs with budget-fraction
    evals, and warnings; None when no run has them."""
    from rlbench.reporting import stats

    if x not in AXES:
        raise ValueError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
    cells: dict[tuple[str, str], dict[int, dict]] = {}  # (task, algorithm) -> seed -> points
    steps: dict[tuple[str, str], list[int]] = {}
    for r in runs:
        if r["row"].get("status") not in (None, "complete"):  # an unfinished run has no whole curve
            continue
        pts = run_points(r, x)
        if pts:
            cells.setdefault((r["row"]["task"], r["row"]["algorithm"]), {})[r["row"]["seed"]] = pts
            if r["row"].get("steps") is not None:
                steps.setdefault((r["row"]["task"], r["row"]["algorithm"]), []).append(int(r["row"]["steps"]))
    if not cells:
        return None
    curve, auc, diffs, fits, warnings = [], [], [], [], []
    for (task, algo), by_seed in cells.items():
        fractions = sorted({f for p in by_seed.values() for f in p})
        inner = [f for f in fractions if f > 0]
        if steps.get((task, algo)) and min(steps[(task, algo)]) < len(inner):
            warnings.append(f"{algo} ({task}): its runs took {min(steps[(task, algo)])} step(s) for {len(inner)} "
                            "budget fractions, so several fractions share one evaluation; the budget is too coarse "
                            "for its step (raise the budget or use fewer fractions)")
        common = [f for f in fractions if all(f in p for p in by_seed.values())]  # every seed reached it
        for f in fractions:
            have = [p[f] for p in by_seed.values() if f in p]
            iv = stats.interval([h["accuracy"] for h in have], bounds=stats.ACCURACY)
            curve.append({"task": task, "algorithm": algo, "fraction": f, "seeds": len(have),
                          "fraction_actual": float(np.mean([h["actual"] for h in have])),
                          "off_fraction": sum(h["off"] for h in have),
                          x: float(np.mean([h["compute"] for h in have])), "accuracy_mean": iv["mean"],
                          "ci_low": iv["low"], "ci_high": iv["high"], "ci_method": iv["method"]})
        iv = stats.interval([_auc(list(p.values())) for p in by_seed.values()])
        auc.append({"task": task, "algorithm": algo, "seeds": iv["n"], "fractions": len(common),
                    "auc_mean": iv["mean"], "auc_ci_low": iv["low"], "auc_ci_high": iv["high"], "ci_method": iv["method"],
                    f"{x}_at_end": float(np.mean([p[max(p)]["compute"] for p in by_seed.values()]))})
        C = [float(np.mean([by_seed[s][f]["compute"] for s in by_seed])) for f in common]
        if common and common[0] == 0.0:
            C[0] = 0.0  # before training: R0
        fit = compare.bootstrap_fit(C, [[by_seed[s][f]["accuracy"] for f in common] for s in sorted(by_seed)])
        fits.append({"task": task, "algorithm": algo, **{k: v for k, v in fit.items() if k != "rmse"},
                     "C": C, "R0": fit.get("R0")})
        if algo == baseline or (task, baseline) not in cells:
            continue
        base = cells[(task, baseline)]
        for f in fractions:
            seeds = [s for s in by_seed if s in base and f in by_seed[s] and f in base[s]]
            d = [by_seed[s][f]["accuracy"] - base[s][f]["accuracy"] for s in seeds]
            if not d:
                continue
            iv = stats.interval(d, bounds=stats.ACCURACY_CHANGE)
            rec = compare.paired_power(d)
            diffs.append({"task": task, "algorithm": algo, "baseline": baseline, "fraction": f, "paired_seeds": len(d),
                          "fraction_actual": float(np.mean([by_seed[s][f]["actual"] for s in seeds])),
                          "baseline_fraction_actual": float(np.mean([base[s][f]["actual"] for s in seeds])),
                          "mean_diff": iv["mean"], "ci_low": iv["low"], "ci_high": iv["high"],
                          "ci_method": iv["method"], "t_test_p": rec["p"]})
    return {"x": x, "curve": curve, "auc": auc, "diffs": diffs, "fits": fits, "warnings": warnings}


def fit_sentence(rec: dict, x: str) -> str:
    """One line per fit: the parameters with their intervals, or why there are none."""
    name = f"{rec['algorithm']} ({rec['task']})"
    if not rec.get("identifiable"):
        return f"{name}: not identifiable — {rec['why']}."
    unit = AXES[x][2].split(" (")[0]
    if "A_ci" not in rec:
        return (f"{name}: asymptote A = {rec['A']:.3f}, efficiency B = {rec['B']:.2f}, half-gain compute C_mid = "
                f"{rec['C_mid']:.3g} {unit}, from R0 = {rec['R0']:.3f} (point fit of the mean curve; no interval — "
                f"{rec['interval'].split(': ', 1)[1]}).")
    return (f"{name}: asymptote A = {rec['A']:.3f} [{rec['A_ci'][0]:.3f}, {rec['A_ci'][1]:.3f}], efficiency "
            f"B = {rec['B']:.2f} [{rec['B_ci'][0]:.2f}, {rec['B_ci'][1]:.2f}], half-gain compute C_mid = "
            f"{rec['C_mid']:.3g} [{rec['C_mid_ci'][0]:.3g}, {rec['C_mid_ci'][1]:.3g}] {unit}, from R0 = {rec['R0']:.3f}.")


def plot(res: dict, folder: Path) -> str:
    """accuracy_vs_{x}.png: mean and 95% interval band per algorithm group, one panel per task, fits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = res["x"]
    tasks = sorted({r["task"] for r in res["curve"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for algo in dict.fromkeys(r["algorithm"] for r in res["curve"] if r["task"] == task):
            rows = sorted((r for r in res["curve"] if r["task"] == task and r["algorithm"] == algo),
                          key=lambda r: r["fraction"])
            xs = [r[x] for r in rows]
            line, = ax.plot(xs, [r["accuracy_mean"] for r in rows], "o-", label=algo, ms=4)
            ax.fill_between(xs, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], alpha=0.15,
                            color=line.get_color())
            fit = next(f for f in res["fits"] if f["task"] == task and f["algorithm"] == algo)
            if fit.get("identifiable"):
                grid = np.linspace(0, max(xs), 200)
                ax.plot(grid, compare.saturating(grid, fit["A"], fit["B"], fit["C_mid"], fit["R0"]), "--", lw=1,
                        color=line.get_color())
        ax.set_title(f"{task} (dashed: saturating fit where identifiable)", fontsize=9)
        ax.set_xlabel(AXES[x][2])
        ax.set_ylabel("held-out accuracy (greedy pass@1)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"accuracy_vs_{x}.png"
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    return name


def markdown(res: dict, baseline: str, fmt) -> list[str]:
    """The report's "Accuracy against compute" section."""
    import pandas as pd

    x = res["x"]
    curve = pd.DataFrame(res["curve"])
    table = curve.pivot_table(index=["task", "algorithm"], columns="fraction", values="accuracy_mean", sort=False)
    table.columns = [f"acc@{c:g}" for c in table.columns]
    table = table.reset_index().merge(pd.DataFrame(res["auc"]), on=["task", "algorithm"])
    actual = curve.pivot_table(index=["task", "algorithm"], columns="fraction", values="fraction_actual", sort=False)
    actual.columns = [f"at@{c:g}" for c in actual.columns]
    table = table.merge(actual.reset_index(), on=["task", "algorithm"])
    lines = ["## Accuracy against compute", "",
             "Held-out accuracy at fractions of each run's budget (`eval.at_budget_fractions`), mean over seeds, each "
             "fraction matched to the run's evaluation nearest to it; `at@f` is the share of the budget actually "
             "spent at that evaluation (mean over seeds: a step is indivisible). `auc_mean` is the normalised area "
             "under each run's curve over its actual fractions (the mean accuracy over the budget), with its 95% "
             f"interval over seeds (`ci_method`: t = Student t). Axis: {AXES[x][2]} (`--x`).", "", fmt(table), ""]
    off = curve[curve["off_fraction"] > 0]
    if len(off):
        lines += ["Evaluations more than half a step's cost from their nominal fraction (`off_fraction`: runs): "
                  + "; ".join(f"{r.algorithm} ({r.task}) at {r.fraction:g}: actual {r.fraction_actual:.2f}, "
                              f"{int(r.off_fraction)} of {int(r.seeds)}" for r in off.itertuples()) + ".", ""]
    for w in res.get("warnings", []):
        lines += [f"**Warning:** {w}.", ""]
    if res["diffs"]:
        lines += [f"Paired differences against `{baseline}` at each fraction (runs matched by seed; t interval, "
                  "paired t-test; both sides' actual fractions):", "", fmt(pd.DataFrame(res["diffs"])), ""]
    lines += ["Saturating fits R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B) (ScaleRL) of the mean curve; 95% intervals "
              "over seed resamples only from 10 seeds on:", ""] + [f"- {fit_sentence(f, x)}" for f in res["fits"]] + [""]
    return lines


def write_csv(res: dict, out: Path) -> None:
    import pandas as pd

    pd.DataFrame(res["curve"]).to_csv(out / "curves.csv", index=False)
    pd.DataFrame(res["auc"]).to_csv(out / "auc.csv", index=False)
    pd.DataFrame(res["diffs"]).to_csv(out / "curve_diffs.csv", index=False)
    pd.DataFrame([{k: v for k, v in f.items() if k != "C"} for f in res["fits"]]).to_csv(out / "fits.csv", index=False)
