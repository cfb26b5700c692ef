"""Out-of-distribution accuracy in a report: every held-out split, the generalisation gap, and paired
tests per split.

Runs that evaluated more held-out splits than ``test`` (``eval.splits``: each eval.jsonl row's
``splits``) get, per task × algorithm group and split, the final accuracy and its gain over step 0
(means over seeds with 95% intervals, ``stats.interval``). A run's generalisation gap is

    gap = gain(test) − mean over its ``ood_`` splits of gain(split)

the share of what it learned in distribution that it did not carry out of it (0: all of it carried;
negative: it gained more out of distribution); the report gives its mean over seeds with the
interval. Per split, each algorithm's final accuracy is compared with the baseline's by the same
paired t-test over seeds as the in-distribution answer (``compare.seed_comparisons``), Holm-adjusted
over the algorithms of that split.

The plot (``plot``): per task, final accuracy per split with one bar per algorithm (95% interval
whiskers) and the step-0 accuracy as a tick on each bar.

Not covered: accuracy-against-compute curves per split (the compute curves are ``test``'s),
problem-level (McNemar) tests per split, a correction across splits (each split is its
own family: state which split a claim is about), splits that only some runs evaluated (a run is
counted on the splits it has).
"""
from __future__ import annotations

from rlbench.reporting import compare, stats


def has_splits(runs: list[dict]) -> bool:
    return any("splits" in e for r in runs for e in r["evals"])


def split_accuracy(e: dict | None, split: str) -> float | None:
    """An eval.jsonl record's accuracy on ``split`` (``test``: the top-level fields), or None."""
    if e is None:
        return None
    return e["accuracy"] if split == "test" else (e.get("splits", {}).get(split) or {}).get("accuracy")


def split_rows(runs: list[dict]) -> list[dict]:
    """One row per run × split: task, algorithm, seed, split, accuracy before / after, gain."""
    rows = []
    for r in runs:
        evals = r["evals"]
        before = next((e for e in evals if e["step"] == 0), None)
        after = evals[-1] if evals and evals[-1]["step"] > 0 else None
        if after is None:
            continue
        names = ["test"] + [s for s in after.get("splits", {})]
        for name in names:
            a, b = split_accuracy(after, name), split_accuracy(before, name)
            rows.append({"task": r["row"]["task"], "algorithm": r["row"]["algorithm"], "seed": r["row"]["seed"],
                         "split": name, "accuracy_before": b, "accuracy_after": a,
                         "gain": a - b if a is not None and b is not None else None})
    return rows


def per_split(rows: list[dict]) -> list[dict]:
    """Per task × algorithm × split: seeds, mean final accuracy and gain with their intervals."""
    out, groups = [], {}
    for r in rows:
        groups.setdefault((r["task"], r["algorithm"], r["split"]), []).append(r)
    for (task, algo, split), g in groups.items():
        acc = stats.interval([r["accuracy_after"] for r in g], bounds=stats.ACCURACY)
        gain = stats.interval([r["gain"] for r in g], bounds=stats.ACCURACY_CHANGE)
        out.append({"task": task, "algorithm": algo, "split": split, "seeds": len(g), "accuracy_after_mean": acc["mean"],
                    "accuracy_after_ci_low": acc["low"], "accuracy_after_ci_high": acc["high"], "gain_mean": gain["mean"],
                    "gain_ci_low": gain["low"], "gain_ci_high": gain["high"], "ci_method": gain["method"]})
    return out


def gaps(rows: list[dict]) -> list[dict]:
    """Per task × algorithm: the generalisation gap (module docstring) over seeds, with its interval."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["task"], r["algorithm"], r["seed"]), {})[r["split"]] = r["gain"]
    per_group: dict = {}
    for (task, algo, seed), g in runs.items():
        ood = [v for k, v in g.items() if k.startswith("ood_") and v is not None]
        if g.get("test") is None or not ood:
            continue
        per_group.setdefault((task, algo), []).append((g["test"], sum(ood) / len(ood)))
    out = []
    for (task, algo), vals in per_group.items():
        gap = stats.interval([t - o for t, o in vals])
        out.append({"task": task, "algorithm": algo, "seeds": len(vals),
                    "gain_in_distribution": sum(t for t, _ in vals) / len(vals),
                    "gain_out_of_distribution": sum(o for _, o in vals) / len(vals),
                    "gap_mean": gap["mean"], "gap_ci_low": gap["low"], "gap_ci_high": gap["high"], "ci_method": gap["method"]})
    return out


def paired(rows: list[dict], baseline: str, mde: float | None = None) -> list[dict]:
    """Per split: every algorithm's final accuracy against the baseline's, paired by seed."""
    import pandas as pd

    out = []
    for split in dict.fromkeys(r["split"] for r in rows):
        frame = pd.DataFrame([r for r in rows if r["split"] == split])
        for rec in compare.seed_comparisons(frame, baseline, mde=mde):
            out.append({"split": split, **{k: v for k, v in rec.items() if k != "sentence"}})
    return out


def answer_lines(paired_rows: list[dict], baseline: str) -> list[str]:
    """One sentence per out-of-distribution split and algorithm: the difference and whether it is significant."""
    lines = []
    for r in paired_rows:
        if not r["split"].startswith("ood_"):
            continue
        d = r["mean_diff"]
        if r["answer"] == "no test":
            verdict = "no test (fewer than 2 paired seeds, or no spread)"
        else:
            who = baseline if d < 0 else r["algorithm"]
            verdict = (f"{who} ahead by {abs(d):.3f}, p = {r['t_test_p']:.2g} (Holm {r['p_holm']:.2g}): {r['answer']}; "
                       f"detectable at this design: ±{r['min_detectable_diff']:.2f}")
        lines.append(f"`{r['split']}` ({r['task']}), {r['algorithm']} − {baseline} over {r['paired_seeds']} seeds: {verdict}.")
    return lines


def plot(rows: list[dict], split_table: list[dict], folder) -> str:
    """``accuracy_by_split.png``: per task, final accuracy per split and algorithm (mean over seeds,
    95% interval whiskers), the step-0 accuracy as a black tick."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in split_table))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in split_table if r["task"] == task]
        names = list(dict.fromkeys(r["split"] for r in mine))
        algos = list(dict.fromkeys(r["algorithm"] for r in mine))
        width = 0.8 / len(algos)
        for k, algo in enumerate(algos):
            by = {r["split"]: r for r in mine if r["algorithm"] == algo}
            xs = [i + (k - (len(algos) - 1) / 2) * width for i in range(len(names))]
            means = [by[n]["accuracy_after_mean"] if n in by else math.nan for n in names]
            err = [[m - by[n]["accuracy_after_ci_low"] if n in by and by[n]["accuracy_after_ci_low"] == by[n]["accuracy_after_ci_low"]
                    else 0 for n, m in zip(names, means)],
                   [by[n]["accuracy_after_ci_high"] - m if n in by and by[n]["accuracy_after_ci_high"] == by[n]["accuracy_after_ci_high"]
                    else 0 for n, m in zip(names, means)]]
            ax.bar(xs, means, width, yerr=err, capsize=2, label=algo)
            before = [[r["accuracy_before"] for r in rows if r["task"] == task and r["algorithm"] == algo
                       and r["split"] == n and r["accuracy_before"] is not None] for n in names]
            ax.scatter(xs, [sum(b) / len(b) if b else math.nan for b in before], marker="_", s=120, color="k",
                       zorder=3, label="before training" if k == 0 else None)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_ylabel("held-out accuracy after training")
        ax.set_ylim(0, 1)
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_by_split.png", dpi=90)
    plt.close(fig)
    return "accuracy_by_split.png"


def markdown(split_table: list[dict], gap_table: list[dict], paired_rows: list[dict], baseline: str, fmt) -> list[str]:
    import pandas as pd

    lines = ["## Out of distribution", "",
             "Final greedy accuracy on every held-out split (`test`: the training distribution; `ood_*`: the task's "
             "out-of-distribution sets), its gain over step 0, and 95% intervals over seeds (splits.csv):", "",
             fmt(pd.DataFrame(split_table)), "",
             "Generalisation gap per run: gain on `test` minus the mean gain over the `ood_` splits (0: everything learned "
             "in distribution carried over; generalisation.csv):", "", fmt(pd.DataFrame(gap_table)), "",
             f"Paired t-tests per split against `{baseline}` (runs matched by seed; Holm over the algorithms of each "
             "split; split_tests.csv):", "",
             fmt(pd.DataFrame(paired_rows)), ""]
    return lines
