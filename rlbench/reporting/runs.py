"""What a report reads: run directories → one record per run, grouped by what the suite names.

A run's group is its task label and its algorithm label (``label`` in the config's task /
algorithm section — a suite writes one for every entry with options — else the plugin name), with
the suite's variant appended (``algo-variant``). Every table, curve, fit, power row, paired test,
infrastructure check and plot of a report is per group, so two labelled variants of one plugin are
two groups, never merged; two runs with the same group and seed are an error (``check_groups``).

Per run: held-out accuracy before / after (greedy pass@1 on the task's fixed test problems), its
peak and whether the run *regressed* (its final accuracy more than 2 standard errors — the final
evaluation's binomial SE — below its own peak: training instability, since greedy evaluation on
fixed problems is deterministic given the weights), the KL to the reference (final eval, exact,
T = 1; and the mean training-step estimate of the sampling policy, π_T), reward, length, tokens,
wall time, device-hours, price, peak memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from rlbench import rundir

SUMMARY_COLUMNS = ["suite", "run", "status", "algorithm", "task", "model", "seed", "steps", "accuracy_before",
                   "accuracy_after", "accuracy_delta", "accuracy_stderr_after", "accuracy_peak", "regressed",
                   "kl_final", "kl_train_mean", "reward_first", "reward_final", "completion_len_final",
                   "tokens_generated", "tokens_trained", "flops", "stopped_by", "wall_seconds", "device_hours",
                   "cost_usd", "peak_memory_gb", "aha_rate_final", "determinism", "batch_invariant_sampling"]
MANIFEST_KEYS = ["versions", "engine", "device", "accelerator", "python", "git_revision", "data", "torch_threads"]
REGRESSION_SE = 2.0  # a final accuracy this many standard errors below the run's own peak is a regression


class ReportError(ValueError):
    """A report that would mislead: duplicate groups, an unknown baseline."""


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


def group_names(cfg: dict) -> tuple[str, str]:
    """(task group, algorithm group) of a resolved config: labels, else plugin names; the variant appended."""
    algo = cfg["algorithm"].get("label") or cfg["algorithm"]["name"]
    variant = cfg.get("run", {}).get("variant")
    return cfg["task"].get("label") or cfg["task"]["name"], algo + (f"-{variant}" if variant else "")


def regression(evals: list[dict]) -> tuple[float | None, bool]:
    """(peak held-out accuracy after step 0, whether the final evaluation is more than
    ``REGRESSION_SE`` of its standard errors below it)."""
    trained = [e for e in evals if e["step"] > 0]
    if not trained:
        return None, False
    peak, last = max(e["accuracy"] for e in trained), trained[-1]
    se = last.get("stderr") or 0.0
    return peak, bool(se > 0 and peak - last["accuracy"] > REGRESSION_SE * se)


def load_run(run_dir: Path, suite: str | None = None, status: str | None = None) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = rundir.read_jsonl(run_dir / "metrics.jsonl")
    evals = rundir.read_jsonl(run_dir / "eval.jsonl")
    cost = json.loads((run_dir / "cost.json").read_text()) if (run_dir / "cost.json").is_file() else {}
    before = next((e for e in evals if e["step"] == 0), None)
    after = evals[-1] if evals and evals[-1]["step"] > 0 else None
    kls = [m["kl"] for m in metrics if "kl" in m]
    peak, regressed = regression(evals)
    task, algorithm = group_names(cfg)
    row = {
        "suite": suite, "run": run_dir.name, "status": status or ("complete" if cost else "incomplete"),
        "algorithm": algorithm, "task": task, "model": cfg["model"]["name"],
        "seed": cfg["run"]["seed"], "steps": metrics[-1]["step"] if metrics else 0,
        "accuracy_before": before["accuracy"] if before else None, "accuracy_after": after["accuracy"] if after else None,
        "accuracy_delta": (after["accuracy"] - before["accuracy"]) if before and after else None,
        "accuracy_stderr_after": after.get("stderr") if after else None,
        "accuracy_peak": peak, "regressed": regressed,
        "kl_final": after.get("kl") if after else None, "kl_train_mean": sum(kls) / len(kls) if kls else None,
        "reward_first": metrics[0].get("reward/mean") if metrics else None,
        "reward_final": metrics[-1].get("reward/mean") if metrics else None,
        "completion_len_final": metrics[-1].get("completion_len/mean") if metrics else None,
        "tokens_generated": cost.get("tokens_generated"), "tokens_trained": cost.get("tokens_trained"),
        "wall_seconds": cost.get("wall_seconds_total"), "device_hours": cost.get("device_hours"),
        "cost_usd": cost.get("price_usd"), "peak_memory_gb": cost.get("peak_device_memory_gb") or cost.get("peak_host_memory_gb"),
        "aha_rate_final": metrics[-1].get("aha/rate") if metrics else None,
        "flops": cost.get("flops_estimate"), "stopped_by": cost.get("stopped_by"),
        "determinism": (manifest.get("determinism") or {}).get("tier"),
        "batch_invariant_sampling": manifest.get("batch_invariant_sampling", cfg.get("rollout", {}).get("batch_invariant_sampling")),
    }
    return {"row": row, "config": cfg, "manifest": manifest, "metrics": metrics, "evals": evals, "dir": run_dir}


def check_groups(runs: list[dict], baseline: str | None, default: str | None = None) -> str:
    """Refuse two runs of one (task, algorithm group, seed) — a report would merge them — and a
    baseline that names no group; returns the baseline (default: ``default`` — the suite's own
    ``baseline`` — where it names a group, else ``grpo`` where present, else the first group)."""
    seen: dict[tuple, str] = {}
    for r in runs:
        key = (r["row"]["task"], r["row"]["algorithm"], r["row"]["seed"])
        if key in seen:
            raise ReportError(f"runs {seen[key]} and {r['dir']} are both task {key[0]!r}, algorithm {key[1]!r}, seed "
                              f"{key[2]}: a report would merge them; give the entries a label (algorithm.label, "
                              "task.label) or a suite variant")
        seen[key] = str(r["dir"])
    groups = list(dict.fromkeys(r["row"]["algorithm"] for r in runs))
    if baseline is None:
        return default if default in groups else ("grpo" if "grpo" in groups else groups[0])
    if baseline not in groups:
        raise ReportError(f"--baseline {baseline!r} matches no group; the groups are: {', '.join(groups)}")
    return baseline


def answers(run: dict) -> dict:
    """{problem id: correct} of a run's final evaluation after training (none before it trained)."""
    ev = run["evals"]
    return dict(zip(ev[-1]["ids"], ev[-1]["correct"])) if ev and ev[-1]["step"] > 0 and "ids" in ev[-1] else {}


def infra_differences(run_a: dict, run_b: dict, treatment: tuple[str, ...] = ()) -> list[str]:
    """Everything that differs between two runs besides the algorithm section, run name, seed and
    variant, and the config keys ``treatment`` names (``section.key``: what the two runs' suite
    variants set — the comparison itself, not its infrastructure)."""
    diffs = []
    skip = tuple(f"config.{k}" for k in treatment)

    def walk(x, y, path):
        if path in skip:
            return
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
    # the plugins' code: the task's, engine's and environment's always; the algorithm's where both runs use it
    pa, pb = dict(run_a["manifest"].get("plugins") or {}), dict(run_b["manifest"].get("plugins") or {})
    if (pa.get("algorithm") or {}).get("name") != (pb.get("algorithm") or {}).get("name"):
        pa.pop("algorithm", None)
        pb.pop("algorithm", None)
    if pa and pb:
        walk(pa, pb, "manifest.plugins")
    return diffs


def by_seed(runs: list[dict], task: str, algorithm: str) -> dict:
    """{seed: run} of one group."""
    return {r["row"]["seed"]: r for r in runs if r["row"]["task"] == task and r["row"]["algorithm"] == algorithm}


def variant_keys(suite_spec: dict) -> dict[str, tuple[str, ...]]:
    """{variant label: the config keys (``section.key``) its ``set`` overrides} of a suite spec."""
    out = {}
    for v in (suite_spec.get("matrix") or {}).get("variant") or []:
        if isinstance(v, dict) and "label" in v:
            out[str(v["label"])] = tuple(str(x).split("=", 1)[0].strip() for x in v.get("set") or [])
    return out


def treatment_keys(run_a: dict, run_b: dict, variants: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The keys two runs' different suite variants set (none when their variants are the same)."""
    va, vb = (r["config"].get("run", {}).get("variant") for r in (run_a, run_b))
    if va == vb:
        return ()
    return tuple(dict.fromkeys(variants.get(str(va), ()) + variants.get(str(vb), ())))
