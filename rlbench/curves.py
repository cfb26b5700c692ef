"""Accuracy against compute: the report's curves, tables and fits on a shared compute axis.

A run with ``eval.at_budget_fractions`` evaluates when the spent share of its budget first
reaches each fraction (rlbench/trainer.py); each eval record carries what was spent by then
(``spent``: FLOPs, generated tokens; ``time_spent``: device-seconds, training wall seconds). Here, per algorithm ×
task over seeds:

* the curve: held-out accuracy at each budget fraction, its mean and a 95% bootstrap band over
  seeds, placed at the mean spent compute on the chosen axis (``--x flops|tokens|device_hours|
  wall_seconds``); the x-positions of different algorithms agree to within one step's cost;
* the table of accuracy at each fraction and the normalised area under the curve (the trapezoid
  over the fraction axis divided by its span: the mean accuracy over the budget, 1.0 = right at once);
* paired differences against the baseline at each fraction (runs matched by seed): mean, 95%
  bootstrap interval, scipy's paired t-test;
* ScaleRL's saturating fit (rlbench.compare.bootstrap_fit) drawn over the points, or the reason
  the points cannot identify it, in words.

Not covered: runs without ``eval.at_budget_fractions`` (their step-wise evals are not on a shared
axis and are left out here); interpolation between fractions.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rlbench import compare

AXES = {  # --x: (key of the eval record's "spent", scale, axis label)
    "flops": ("flops", 1.0, "FLOPs (nominal, every pass counted)"),
    "tokens": ("tokens", 1.0, "generated tokens"),
    "device_hours": ("device_seconds", 1 / 3600, "device-hours (training phases)"),
    "wall_seconds": ("wall_seconds", 1.0, "training wall seconds"),
}


def run_points(run: dict, x: str) -> dict[float, tuple[float, float]]:
    """{budget fraction: (compute on axis ``x``, accuracy)} of one run's evals."""
    key, scale, _ = AXES[x]
    out = {}
    for e in run["evals"]:
        for f in e.get("budget_fractions") or []:
            spent = {**(e.get("spent") or {}), **(e.get("time_spent") or {})}
            out[float(f)] = (float(spent.get(key, 0.0)) * scale, float(e["accuracy"]))
    return out


def _boot(vals, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    vals = np.asarray(vals, dtype=float)
    if len(vals) < 2:
        return (float(vals[0]), float(vals[0])) if len(vals) else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = vals[rng.integers(0, len(vals), (n, len(vals)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _auc(pts: dict[float, tuple[float, float]]) -> float:
    fr = sorted(pts)
    if len(fr) < 2:
        return math.nan
    acc = [pts[f][1] for f in fr]
    area = sum((fr[i + 1] - fr[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(fr) - 1))
    return area / (fr[-1] - fr[0])


def build(runs: list[dict], baseline: str, x: str = "flops") -> dict | None:
    """Curve, AUC, paired-difference and fit tables (lists of dicts) of the runs with budget-fraction
    evals; None when no run has them."""
    if x not in AXES:
        raise ValueError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
    cells: dict[tuple[str, str], dict[int, dict]] = {}  # (task, algorithm) -> seed -> points
    for r in runs:
        if r["row"].get("status") not in (None, "complete"):  # an unfinished run has no whole curve
            continue
        pts = run_points(r, x)
        if pts:
            cells.setdefault((r["row"]["task"], r["row"]["algorithm"]), {})[r["row"]["seed"]] = pts
    if not cells:
        return None
    curve, auc, diffs, fits = [], [], [], []
    for (task, algo), by_seed in cells.items():
        fractions = sorted({f for p in by_seed.values() for f in p})
        common = [f for f in fractions if all(f in p for p in by_seed.values())]  # every seed reached it
        for f in fractions:
            have = [p[f] for p in by_seed.values() if f in p]
            lo, hi = _boot([a for _, a in have])
            curve.append({"task": task, "algorithm": algo, "fraction": f, "seeds": len(have),
                          x: float(np.mean([c for c, _ in have])), "accuracy_mean": float(np.mean([a for _, a in have])),
                          "ci_low": lo, "ci_high": hi})
        aucs = [_auc({f: p[f] for f in common}) for p in by_seed.values()]
        lo, hi = _boot(aucs)
        auc.append({"task": task, "algorithm": algo, "seeds": len(aucs), "fractions": len(common),
                    "auc_mean": float(np.mean(aucs)), "auc_ci_low": lo, "auc_ci_high": hi,
                    f"{x}_at_end": float(np.mean([p[max(p)][0] for p in by_seed.values()]))})
        C = [float(np.mean([by_seed[s][f][0] for s in by_seed])) for f in common]
        if common and common[0] == 0.0:
            C[0] = 0.0  # before training: R0
        fit = compare.bootstrap_fit(C, [[by_seed[s][f][1] for f in common] for s in sorted(by_seed)])
        fits.append({"task": task, "algorithm": algo, **{k: v for k, v in fit.items() if k != "rmse"},
                     "C": C, "R0": fit.get("R0")})
        if algo == baseline or (task, baseline) not in cells:
            continue
        base = cells[(task, baseline)]
        for f in fractions:
            d = [by_seed[s][f][1] - base[s][f][1] for s in by_seed if s in base and f in by_seed[s] and f in base[s]]
            if not d:
                continue
            lo, hi = _boot(d)
            rec = compare.paired_power(d)
            diffs.append({"task": task, "algorithm": algo, "baseline": baseline, "fraction": f, "paired_seeds": len(d),
                          "mean_diff": float(np.mean(d)), "ci_low": lo, "ci_high": hi, "t_test_p": rec["p"]})
    return {"x": x, "curve": curve, "auc": auc, "diffs": diffs, "fits": fits}


def fit_sentence(rec: dict, x: str) -> str:
    """One line per fit: the parameters with their intervals, or why there are none."""
    name = f"{rec['algorithm']} ({rec['task']})"
    if not rec.get("identifiable"):
        return f"{name}: not identifiable — {rec['why']}."
    unit = AXES[x][2].split(" (")[0]
    return (f"{name}: asymptote A = {rec['A']:.3f} [{rec['A_ci'][0]:.3f}, {rec['A_ci'][1]:.3f}], efficiency "
            f"B = {rec['B']:.2f} [{rec['B_ci'][0]:.2f}, {rec['B_ci'][1]:.2f}], half-gain compute C_mid = "
            f"{rec['C_mid']:.3g} [{rec['C_mid_ci'][0]:.3g}, {rec['C_mid_ci'][1]:.3g}] {unit}, from R0 = {rec['R0']:.3f}.")


def plot(res: dict, folder: Path) -> str:
    """accuracy_vs_{x}.png: mean and bootstrap band per algorithm, one panel per task, fits dashed."""
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
    lines = ["## Accuracy against compute", "",
             f"Held-out accuracy at fixed fractions of each run's budget (`eval.at_budget_fractions`), mean over seeds; "
             f"`auc_mean` is the normalised area under the curve (the mean accuracy over the budget), with its 95% "
             f"bootstrap interval over seeds. Axis: {AXES[x][2]} (`--x`).", "", fmt(table), ""]
    if res["diffs"]:
        lines += [f"Paired differences against `{baseline}` at each fraction (runs matched by seed; bootstrap interval, "
                  "paired t-test):", "", fmt(pd.DataFrame(res["diffs"])), ""]
    lines += ["Saturating fits R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B) (ScaleRL), 95% intervals over seed resamples:",
              ""] + [f"- {fit_sentence(f, x)}" for f in res["fits"]] + [""]
    return lines


def write_csv(res: dict, out: Path) -> None:
    import pandas as pd

    pd.DataFrame(res["curve"]).to_csv(out / "curves.csv", index=False)
    pd.DataFrame(res["auc"]).to_csv(out / "auc.csv", index=False)
    pd.DataFrame(res["diffs"]).to_csv(out / "curve_diffs.csv", index=False)
    pd.DataFrame([{k: v for k, v in f.items() if k != "C"} for f in res["fits"]]).to_csv(out / "fits.csv", index=False)
