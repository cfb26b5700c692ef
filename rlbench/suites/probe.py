"""The learnability probe: before spending compute, does this config's task give a
group-relative algorithm anything to learn from with this model?

``rlbench probe CONFIG`` loads the run's own model, engine and task, samples the run's group
size G of completions (its temperature, top_p and max_tokens) for N prompts of the train split,
plus one greedy completion each, and reports:

* base accuracy, sampled and greedy (the task's ``accuracy`` component ≥ 1);
* the share of groups whose summed rewards are all equal: their advantages are exactly 0, so they
  carry no GRPO / RLOO / Dr. GRPO signal (``ops.uniform_groups``, the trainer's own test), and the
  expected number of the step's ``prompts_per_step`` groups that do carry signal; the same for
  accuracy alone, since a group that differs only in its format reward teaches format, not answers
  (the verdict reads this one);
* format rate, truncation rate (finish reason ``length``), mean completion length;
* for binary accuracy, the predicted signal share at other group sizes, 1 − mean_i(p_i^G + (1 − p_i)^G)
  with p_i each prompt's sampled accuracy (a uniform group under accuracy alone; a varying
  format reward can only add signal);
* a one-line verdict with the knob to turn: a harder task when it is saturated, an easier task (or
  a longer budget when completions are cut off) when it is flat, a larger group when few groups
  carry signal.

Not covered: the probe samples the base model once, so it says nothing about how fast the signal
moves once training starts; the prompts are the train split's first N under seed 0 (not the
run's step draws) and are not passed through ``rollout.long_prompts``; dynamic sampling and
offline algorithms (DPO from a pairs file) are not modelled.
"""
from __future__ import annotations

import math
import time

import torch

from rlbench import ops
from rlbench.training.evaluation import EvalPlan, evaluate
from rlbench.training.faults import TrainingError
from rlbench.training import task_check
from rlbench.training.sampler import standalone

SATURATED = 0.9  # sampled accuracy above this: little left to learn
FLAT = 0.02  # sampled accuracy below this: almost no reward to follow
TRUNCATED = 0.3  # share of completions cut off by max_tokens above this: the budget is the problem
ENOUGH_SIGNAL = 0.5  # share of groups with unequal rewards a step should have


def run(cfg, prompts: int = 32) -> dict:
    """Probe ``cfg`` (a resolved config) on ``prompts`` train prompts; the record of ``summarize``."""
    t = time.perf_counter()
    ro = cfg.rollout
    task_check.preflight(cfg)  # a task whose verifier rejects its own gold answers is not probed
    with standalone(cfg) as (engine, task, generate):  # vLLM: seeded by seeds.engine_seed
        torch.manual_seed(cfg.run.seed)  # the hf engine samples from torch's global RNG: the same probe twice
        sampled, rollouts = evaluate(engine, task, EvalPlan("train", prompts, ro.group_size, ro.max_tokens,
                                                            ro.temperature, ro.top_p, keep_completions=True),
                                     generate=generate)
        greedy, _ = evaluate(engine, task, EvalPlan("train", prompts, samples=1, max_tokens=ro.max_tokens),
                             generate=generate)
    rec = summarize(sampled, greedy, ro.group_size, ro.prompts_per_step, ro.max_tokens,
                    groups=rollouts.group.tolist() if rollouts is not None else [])
    if rollouts is not None and rollouts.turns:  # an environment: how the base model uses it
        recs = rollouts.turns
        rec.update(env_tool_call_rate=sum(r["tool_calls"] > 0 for r in recs) / len(recs),
                   env_tool_calls_mean=sum(r["tool_calls"] for r in recs) / len(recs),
                   env_turns_mean=sum(r["turns"] for r in recs) / len(recs),
                   env_errors=sum(r["errors"] for r in recs), env_tool_errors=sum(r["tool_errors"] for r in recs))
    rec.update(model=cfg.model.name, task=cfg.label("task"), engine=cfg.names["engine"],
               temperature=ro.temperature, seconds=time.perf_counter() - t)
    return rec


def summarize(sampled: dict, greedy: dict, group_size: int, prompts_per_step: int, max_tokens: int = 0,
              groups: list[int] | None = None) -> dict:
    """The probe's figures from two evaluation records (``evaluation.evaluate``): ``sampled`` with
    ``group_size`` samples per prompt and its completions kept, ``greedy`` with one. ``groups``: the
    prompt index of each completion (the rollouts' ``group``; a task may draw the same problem twice,
    so ids alone do not say which completions form a group); default: by id."""
    G = group_size
    comps = sampled["completions"]
    keys = groups if groups is not None else [sampled["ids"].index(c["id"]) for c in comps]
    by_prompt: dict[int, list[dict]] = {}
    for k, c in zip(keys, comps):
        by_prompt.setdefault(k, []).append(c)
    full = [by_prompt[k] for k in sorted(by_prompt) if len(by_prompt[k]) == G]
    if not full:
        raise TrainingError("probe: no prompt got its group of completions back from the engine")
    components = [k for k in comps[0] if k not in ("id", "text")]
    totals = torch.tensor([[sum(float(c[k]) for k in components) for c in g] for g in full])  # [P, G]
    uniform = ops.uniform_groups(totals.reshape(-1), G).float().mean().item()
    acc = torch.tensor([[float(c.get("accuracy", 0.0)) for c in g] for g in full])  # [P, G]
    acc_uniform = ops.uniform_groups(acc.reshape(-1), G).float().mean().item()
    p = (acc >= 1.0).double().mean(-1)  # [P] per-prompt accuracy
    binary = bool(((acc == 0) | (acc == 1)).all()) and "accuracy" in components
    predicted = {str(g): 1.0 - float((p ** g + (1 - p) ** g).mean()) for g in (2, 4, 8, 16, 32, 64)} if binary else {}
    rec = {
        "prompts": len(full), "group_size": G, "max_tokens": max_tokens,
        "accuracy_sampled": sampled["accuracy"], "accuracy_sampled_ci95": sampled["ci95"],
        "accuracy_greedy": greedy["accuracy"],
        # what the trainer sees (summed rewards) and what is about the answer (accuracy alone)
        "uniform_groups": uniform, "signal_groups": 1.0 - uniform,
        "accuracy_signal_groups": 1.0 - acc_uniform,
        "signal_prompts_per_step": (1.0 - uniform) * prompts_per_step,
        "accuracy_signal_prompts_per_step": (1.0 - acc_uniform) * prompts_per_step, "prompts_per_step": prompts_per_step,
        "format_rate": sampled["format_rate"], "truncated_frac": sampled["truncated_frac"],
        "completion_len": sampled["completion_len"], "predicted_signal_by_group_size": predicted,
        "group_rewards": totals.tolist(),  # [P][G] summed rewards, prompt by prompt
    }
    rec["verdict"] = verdict(rec)
    return rec


def verdict(rec: dict) -> str:
    """One line: is there a signal about the answer, and if not, which knob to turn."""
    acc, G = rec["accuracy_sampled"], rec["group_size"]
    signal, total = rec["accuracy_signal_groups"], rec["signal_groups"]
    if acc >= SATURATED:
        return (f"saturated: the base model already solves {acc:.0%} of the samples; use a harder task "
                f"(or a smaller model), or the curves will be flat at the top")
    if rec["truncated_frac"] >= TRUNCATED:
        return (f"budget-bound: {rec['truncated_frac']:.0%} of completions hit rollout.max_tokens "
                f"({rec['max_tokens']}); raise it before reading accuracy")
    if acc <= FLAT:
        hint = "; greedy does better, so lower rollout.temperature" if rec["accuracy_greedy"] > 2 * acc + 0.02 else ""
        return (f"flat: {acc:.1%} of samples are correct, almost no reward to follow; use an easier task "
                f"or a larger model{hint}")
    fmt = (f" ({total - signal:.0%} more differ in the format reward only)" if total - signal >= 0.05 else "")
    if signal < ENOUGH_SIGNAL:
        bigger = [int(g) for g, s in rec["predicted_signal_by_group_size"].items() if int(g) > G and s >= ENOUGH_SIGNAL]
        knob = (f"raise rollout.group_size to {bigger[0]} (predicted {rec['predicted_signal_by_group_size'][str(bigger[0])]:.0%} "
                f"of groups with signal)" if bigger else "raise rollout.temperature or use an easier task")
        return f"weak signal: only {signal:.0%} of groups differ in accuracy at G={G}{fmt}; {knob}"
    return (f"learnable: {signal:.0%} of groups differ in accuracy (~{rec['accuracy_signal_prompts_per_step']:.1f} of "
            f"{rec['prompts_per_step']} prompts per step){fmt} at base accuracy {acc:.0%}")


def table(rec: dict) -> str:
    """The probe record as aligned text lines."""
    lo, hi = rec["accuracy_sampled_ci95"]
    rows = [
        ("model / task / engine", f"{rec.get('model')} / {rec.get('task')} / {rec.get('engine')}"),
        ("prompts × group size", f"{rec['prompts']} × {rec['group_size']}"),
        ("accuracy, sampled", f"{rec['accuracy_sampled']:.3f} (95% CI {lo:.3f}-{hi:.3f})"),
        ("accuracy, greedy", f"{rec['accuracy_greedy']:.3f}"),
        ("groups with all rewards equal", f"{rec['uniform_groups']:.3f} (no group-relative signal)"),
        ("groups differing in accuracy", f"{rec['accuracy_signal_groups']:.3f} (the rest of the signal is format)"),
        ("prompts per step with signal", f"{rec['signal_prompts_per_step']:.1f} of {rec['prompts_per_step']} "
                                         f"({rec['accuracy_signal_prompts_per_step']:.1f} in accuracy)"),
        ("format rate", f"{rec['format_rate']:.3f}"),
        ("truncated (hit max_tokens)", f"{rec['truncated_frac']:.3f}"),
        *([("environment: tool-call rate", f"{rec['env_tool_call_rate']:.3f} of trajectories call a tool "
                                            f"({rec['env_tool_calls_mean']:.2f} calls, {rec['env_tool_errors']} failed)"),
           ("environment: turns", f"{rec['env_turns_mean']:.2f} per trajectory ({rec['env_errors']} environment errors)")]
          if "env_turns_mean" in rec else []),
        ("mean completion length", f"{rec['completion_len']:.1f} tokens"),
    ]
    if rec["predicted_signal_by_group_size"]:
        rows.append(("signal share by group size", ", ".join(f"G={g}: {s:.2f}" for g, s in
                                                          rec["predicted_signal_by_group_size"].items())))
    if "seconds" in rec and math.isfinite(rec["seconds"]):
        rows.append(("probe time", f"{rec['seconds']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + f"\nverdict: {rec['verdict']}"
