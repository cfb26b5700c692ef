"""The report's step plots and its accuracy-against-cost plot (matplotlib, written as PNG).

Each step plot is a metric's mean over seeds per algorithm, with markers at every logged step (a
run of one step is a visible point) and the range over seeds as a band; the step axis has integer
ticks. A metric that is 0 in every run at every step is not drawn: the report says so in a sentence.
An axis that one run's outlier would set (its largest value more than ``OUTLIER`` times the 95th
percentile of all values) is clipped at 1.2 × that percentile, with a note naming the run.

Not covered: log-scaled axes (clipping with a named run reads faster at these sizes).
"""
from __future__ import annotations

from pathlib import Path

OUTLIER = 5.0
STEP_METRICS = [("reward/mean", "reward"), ("kl", "KL to reference (per token)"),
                ("completion_len/mean", "completion length (tokens)"), ("aha/rate", "aha-moment rate")]


def _series(runs, key):
    out = {}
    for r in runs:
        pts = [(m["step"], m[key]) for m in r["metrics"] if key in m]
        if pts:
            out.setdefault((r["row"]["task"], r["row"]["algorithm"]), []).append((r["row"]["run"], pts))
    return out


def no_signal(runs) -> bool:
    """No run earned any reward at any step (a report of such runs compares nothing)."""
    values = [m.get("reward/mean") for r in runs for m in r["metrics"] if "reward/mean" in m]
    return bool(values) and all(v == 0 for v in values)


def _clip(series) -> tuple[float | None, str | None]:
    """(upper limit, note) when one run's outlier would set the axis, else (None, None)."""
    import numpy as np

    values = [(v, run) for runs_pts in series.values() for run, pts in runs_pts for _, v in pts]
    if len(values) < 5:
        return None, None
    arr = np.array([v for v, _ in values], dtype=float)
    p95 = float(np.percentile(arr, 95))
    top, who = max(values)
    if p95 > 0 and top > OUTLIER * p95:
        return 1.2 * p95, f"its largest value, {top:.3g}, is run {who}'s"
    return None, None


def plots(runs, summary, folder: Path) -> tuple[list[str], list[str]]:
    """The plot files written into ``folder`` and the sentences for what was not drawn or clipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    files, notes = [], []
    for key, label in STEP_METRICS:
        series = _series(runs, key)
        if not series:
            continue
        if all(v == 0 for runs_pts in series.values() for _, pts in runs_pts for _, v in pts):
            notes.append(f"{label}: 0 in every run at every step (not drawn).")
            continue
        limit, why = _clip(series)
        tasks = sorted({t for t, _ in series})
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for (t, algo), runs_pts in sorted(series.items()):
                if t != task:
                    continue
                every = [pts for _, pts in runs_pts]
                steps = sorted({s for pts in every for s, _ in pts})
                at = [[v for pts in every for s2, v in pts if s2 == s] for s in steps]
                ax.plot(steps, [sum(a) / len(a) for a in at], marker="o", ms=3, label=algo)
                ax.fill_between(steps, [min(a) for a in at], [max(a) for a in at], alpha=0.15)
            ax.set_title(task)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if limit is not None:
                ax.set_ylim(top=limit)
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{key.replace('/', '_')}_vs_step.png"
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        files.append(name)
        if limit is not None:
            notes.append(f"{label}: the axis is clipped at {limit:.3g}; {why}.")
    pts = summary.dropna(subset=["accuracy_after", "wall_seconds"])
    if len(pts):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for algo, g in pts.groupby("algorithm"):
            ax.scatter(g["wall_seconds"], g["accuracy_after"], label=algo)
        front, best = [], -1.0
        for _, r in pts.sort_values(["wall_seconds", "accuracy_after"], ascending=[True, False]).iterrows():
            if r["accuracy_after"] > best:
                front.append((r["wall_seconds"], r["accuracy_after"]))
                best = r["accuracy_after"]
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="k", lw=1, label="Pareto front")
        ax.set_xlabel("wall seconds (whole run)")
        ax.set_ylabel("held-out accuracy after")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "accuracy_vs_cost.png", dpi=90)
        plt.close(fig)
        files.append("accuracy_vs_cost.png")
    return files, notes
