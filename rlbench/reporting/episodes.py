"""What a report says of multi-turn runs (an ``env`` section; rlbench/environments): per task ×
algorithm, the training trajectories' shape and faults, and the held-out share solved within each
attempt where the environment counts attempts (``retry``).

From every step of metrics.jsonl, averaged over a run's steps and then over its seeds: turns and
tool calls per trajectory, and the share of trajectories whose chat-template rendering differs
from the trained tokens (``env/drift_frac``: what re-tokenizing the conversation would have
changed). Summed over a run's steps, then over seeds: environment errors, tool errors and
``env/template_drift`` (the positions that differ; one token split in two shifts every later
position, so a single event counts many). From the
final evaluation, mean over seeds: ``solved_by_attempt`` (k = 1 is first-try accuracy).

Not covered: per-turn rewards and the filtered share (``env/filtered_frac``) are in metrics.jsonl
and the per-run plots, not here.
"""
from __future__ import annotations

import numpy as np

MEANS = {"turns": "env/turns_mean", "tool_calls": "env/tool_calls_mean", "drift_frac": "env/drift_frac"}
TOTALS = {"env_errors": "env/errors", "tool_errors": "env/tool_errors", "template_drift": "env/template_drift"}


def rows(runs: list[dict]) -> list[dict]:
    """One row per task × algorithm of the multi-turn runs (module docstring); [] when there are none."""
    groups: dict = {}
    for r in runs:
        if any("env/turns_mean" in m for m in r["metrics"]):
            groups.setdefault((r["row"]["task"], r["row"]["algorithm"]), []).append(r)
    out = []
    for (task, algo), g in groups.items():
        row = {"task": task, "algorithm": algo, "seeds": len(g)}
        for name, key in MEANS.items():
            row[f"{name}_mean"] = float(np.mean([np.mean([m[key] for m in r["metrics"] if key in m]) for r in g]))
        for name, key in TOTALS.items():
            row[name] = float(sum(m.get(key, 0.0) for r in g for m in r["metrics"]))
        finals = [r["evals"][-1].get("solved_by_attempt") for r in g if r["evals"] and r["evals"][-1]["step"] > 0]
        finals = [f for f in finals if f]
        if finals:
            width = max(len(f) for f in finals)  # a run that solved everything early made fewer attempts
            padded = [f + [f[-1]] * (width - len(f)) for f in finals]
            for k in range(width):
                row[f"solved_by_attempt_{k + 1}"] = float(np.mean([p[k] for p in padded]))
        out.append(row)
    return out


def markdown(table: list[dict], fmt) -> list[str]:
    import pandas as pd

    return ["## Multi-turn trajectories", "",
            "Per algorithm: turns and tool calls per training trajectory and `drift_frac`, the share of trajectories "
            "whose chat-template rendering differs from the trained tokens (what re-tokenizing the conversation would "
            "have changed; rlbench trains the sampled tokens as sampled), each a mean over steps, then seeds; "
            "environment errors, tool errors and `template_drift` summed over every step and seed (`template_drift`: "
            "positions that differ; one token split in two shifts every later position); `solved_by_attempt_k`: the "
            "share of held-out "
            "problems answered right within k attempts at the final evaluation (mean over seeds; k = 1 is first-try "
            "accuracy). environment.csv.", "", fmt(pd.DataFrame(table)), ""]
