"""Held-out evaluation and reward scoring: one code path for training runs, ``rlbench eval``
and ``rlbench reward``, so the reported accuracy uses exactly the training verifier.

Accuracy is pass@1: greedy with one sample per problem, else the mean share of
correct samples. pass@k uses the unbiased estimator of Chen et al. (2021),
1 − C(n−c, k) / C(n, k) per problem with c of n samples correct, averaged over
problems. The 95% interval is the normal approximation over problems,
mean ± 1.96 · sd / √N, clipped to [0, 1] (Wilson's interval would be tighter
near 0 and 1 for greedy accuracy; the difference is small at N ≥ 100).

Temperatures: training evaluations are greedy; ``rlbench eval --samples N`` samples at its own
``--temperature``. The exact KL to the reference (``during_training``) is of the models' own
distributions (T = 1) on the greedy completions, whatever ``rollout.temperature`` is: it measures
how far the model moved. The training-step ``kl`` is of π_T, the sampling distribution
(rlbench/modeling/logprobs.py).
"""
from __future__ import annotations

import difflib
import math
import time
from dataclasses import dataclass
from math import comb
from typing import TYPE_CHECKING

import torch

from rlbench.config_types import ConfigError
from rlbench.environments import episodes
from rlbench.training import dist
from rlbench.modeling import logprobs as lpmod
from rlbench.types import DataError, Prompt, RolloutEngine, Sampling, Task

if TYPE_CHECKING:
    from rlbench.config import EvalConfig
    from rlbench.training.accumulate import MicroBatching


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c of n samples correct (k ≤ n)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, standard error, half-width of the 95% normal interval) over problems."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 0.0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n)
    return mean, se, 1.96 * se


@dataclass(frozen=True)
class EvalPlan:
    """What one evaluation generates: ``limit`` problems of ``split``, ``samples`` completions each
    (1: greedy), and the sampler settings of sampled ones."""

    split: str = "test"
    limit: int = 200
    samples: int = 1
    max_tokens: int = 512
    temperature: float = 0.8  # samples > 1 only
    top_p: float = 1.0
    keep_completions: bool = False  # every completion with its reward components, for auditing the verifier


def evaluate(engine: RolloutEngine, task: Task, plan: EvalPlan = EvalPlan(), fit_prompts=None, generate=None,
             shard: tuple[int, int] | None = None):
    """Generate on ``plan.limit`` held-out problems and score them with the task's verifier.

    Returns (record, rollouts): the record holds accuracy (pass@1), its standard
    error and 95% interval, pass@k for k = 1, 2, 4, … ≤ samples, the mean of every
    reward component, the format rate and per-problem correct counts (and, with
    ``keep_completions``, every completion with its reward components, for auditing the verifier).
    The trainer passes ``fit_prompts`` (its long-prompt policy; what it skipped or truncated is
    recorded as prompts_skipped / prompts_truncated) and ``generate`` (its engine-fault recovery).
    In a multi-process run it passes ``shard`` = (rank, world): this process generates for its
    contiguous share of the problems, and every rank's raw results, gathered in rank order, make
    the record cover all of them; ``rollouts`` stay this rank's."""
    t = time.perf_counter()
    split, samples, keep_completions = plan.split, plan.samples, plan.keep_completions
    prompts = task.prompts(split, plan.limit, seed=0)
    fitted: dict = {}
    if fit_prompts is not None:
        prompts = fit_prompts(prompts, fitted)
    if shard is not None:
        r, w = shard
        bounds = [len(prompts) * i // w for i in range(w + 1)]
        prompts = prompts[bounds[r]:bounds[r + 1]]
    greedy = samples == 1
    sampling = Sampling(temperature=plan.temperature, top_p=plan.top_p, max_tokens=plan.max_tokens, greedy=greedy,
                        logprobs=False)
    rollouts = (generate or engine.generate)(prompts, samples, sampling) if prompts else None
    raw = {"ids": [p.id for p in prompts], "group": [], "scores": {}, "lengths": [], "finish": [], "texts": [],
           "attempts": []}
    if rollouts is not None:
        expanded = [prompts[g] for g in rollouts.group.tolist()]
        raw.update(group=rollouts.group.tolist(), scores=episodes.scores(task, expanded, rollouts),
                   lengths=rollouts.lengths().tolist(), finish=list(rollouts.finish_reasons),
                   texts=list(rollouts.texts) if keep_completions else [],
                   attempts=[r.get("attempts") for r in rollouts.turns] if rollouts.turns else [])
    if shard is not None and shard[1] > 1:
        raw = merge_raw(dist.gather_objects(raw))
    rec = {"split": split, **summarize(raw, samples, keep_completions)}
    rec.update({k.replace("/", "_"): v for k, v in fitted.items()})
    rec["time"] = time.perf_counter() - t
    return rec, rollouts


@torch.no_grad()
def during_training(sampler, weights, reference, ev: EvalConfig, plan: MicroBatching, step: int,
                    splits: list[str] = ()) -> dict:
    """The trainer's held-out evaluation: greedy pass@1 on ``eval.n`` problems through ``evaluate``
    (the sampler's engine, long-prompt policy and engine-fault recovery; sharded over its ranks)
    plus, with ``eval.kl``, the exact KL(policy ‖ reference) summed over the vocabulary on those
    completions (micro-batched as ``plan``; of the models' own distributions, T = 1), the same
    measure for every algorithm. Each other held-out split in ``splits`` (``eval.splits`` as
    ``eval_splits`` resolved it at setup) is evaluated the same way, without the KL, into
    ``splits`` (name → ``SPLIT_FIELDS``); the top-level fields stay ``test``'s."""
    t = time.perf_counter()
    world = sampler.world

    def run(split: str):
        return evaluate(sampler.engine, sampler.task, EvalPlan(split, ev.n, samples=1, max_tokens=ev.max_tokens),
                        fit_prompts=lambda ps, m: sampler.fit_prompts(ps, m, step, count=False),
                        generate=lambda ps, n, smp: sampler.rollouts(ps, n, smp, step)[0],
                        shard=(sampler.rank, world) if world > 1 else None)

    rec, rollouts = run("test")
    rec = {"step": step, **rec}
    if splits:
        rec["splits"] = {}
        for name in splits:
            r, _ = run(name)
            rec["splits"][name] = {k: r[k] for k in SPLIT_FIELDS}
    if ev.kl:
        kl_sum, tokens = 0.0, 0.0
        if rollouts is not None:
            inputs = rollouts.model_inputs()
            weights.model.eval()
            device = sampler.device
            kl = lpmod.exact_kl(weights.whole, reference, inputs["input_ids"].to(device),
                                inputs["attention_mask"].to(device), rollouts.completion_mask.to(device),
                                plan.size, plan.share_prompts)  # [n, C]
            kl_sum, tokens = kl.sum().item(), rollouts.completion_mask.sum().item()
        kl_sum, tokens = dist.sum_floats([kl_sum, tokens])
        rec["kl"] = kl_sum / max(1.0, tokens)
    rec["time"] = time.perf_counter() - t
    return rec


# what eval.jsonl keeps of each extra split's evaluation (``splits``: name → these)
SPLIT_FIELDS = ("n", "accuracy", "stderr", "ci95", "format_rate", "completion_len", "correct", "ids")


def eval_splits(task: Task, splits) -> list[str]:
    """The held-out splits ``eval.splits`` names beyond ``test``, checked against the task's
    ``splits()`` (a task without it offers only ``test``); ``"all"``: every one it offers."""
    offered = list(task.splits()) if hasattr(task, "splits") else ["test"]
    if splits == "all":
        return [s for s in offered if s != "test"]
    for name in splits:
        if name not in offered:
            close = difflib.get_close_matches(name, offered, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config: eval.splits names {name!r}, which task {type(task).__name__} does not offer "
                              f"(it has {', '.join(offered)}){hint}")
    return [s for s in dict.fromkeys(splits) if s != "test"]


def merge_raw(parts: list[dict]) -> dict:
    """Concatenate per-rank raw evaluation results (problem order = rank order)."""
    out = {"ids": [], "group": [], "scores": {}, "lengths": [], "finish": [], "texts": [], "attempts": []}
    for part in parts:
        offset = len(out["ids"])
        out["ids"] += part["ids"]
        out["group"] += [g + offset for g in part["group"]]
        for k, v in part["scores"].items():
            out["scores"].setdefault(k, []).extend(v)
        for k in ("lengths", "finish", "texts", "attempts"):
            out[k] += part[k]
    return out


def summarize(raw: dict, samples: int, keep_completions: bool = False) -> dict:
    """The evaluation record of raw results: per-completion scores, lengths and finish reasons."""
    scores, n = raw["scores"], len(raw["group"])
    counts = [0] * len(raw["ids"])
    for g, ok in zip(raw["group"], scores.get("accuracy", [])):
        counts[g] += int(ok >= 1.0)
    per_problem = [c / samples for c in counts]
    acc, se, half = interval(per_problem)
    rec = {"n": len(raw["ids"]), "samples": samples, "greedy": samples == 1, "accuracy": acc, "stderr": se,
           "ci95": [max(0.0, acc - half), min(1.0, acc + half)]}
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= samples]
    rec["pass@k"] = {str(k): interval([pass_at_k(samples, c, k) for c in counts])[0] for k in ks}
    for k, v in scores.items():
        if k != "accuracy":
            rec[f"reward/{k}"] = sum(v) / max(1, len(v))
    rec["format_rate"] = sum(1 for v in scores.get("format", []) if v > 0) / max(1, n)
    rec["completion_len"] = sum(raw["lengths"]) / max(1, n)
    rec["truncated_frac"] = sum(f == "length" for f in raw["finish"]) / max(1, n)
    attempts = raw["attempts"]
    by_attempt = episodes.solved_by_attempt(attempts, max((len(a) for a in attempts if a), default=0))
    if by_attempt:  # an environment with attempts (retry): the share solved within k attempts, k = 1 … the most made
        rec["solved_by_attempt"] = [by_attempt[k] for k in sorted(by_attempt)]
    rec["correct"] = counts
    rec["ids"] = list(raw["ids"])
    if keep_completions:
        rec["completions"] = [{"id": raw["ids"][g], "text": text, **{k: v[i] for k, v in scores.items()}}
                              for i, (g, text) in enumerate(zip(raw["group"], raw["texts"]))]
    return rec


def score_rows(task: Task, rows: list[dict], where: str = "input") -> list[dict]:
    """``rlbench reward``: rows with ``completion`` and the task's reference field(s); each
    comes back with ``reward`` (the sum) and ``components``."""
    prompts, texts = [], []
    ref = getattr(task, "reference", None)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
            raise DataError(f"{where} line {i}: needs a string 'completion'")
        try:
            answer = ref(row) if ref else row["answer"]
        except KeyError as e:
            raise DataError(f"{where} line {i}: missing {e.args[0]!r} (the reference this task needs)") from None
        prompts.append(Prompt(id=str(row.get("id", i)), text=str(row.get("prompt", "")), answer=answer,
                              meta={"prefilled_think": bool(row.get("prefilled_think", False))}))
        texts.append(row["completion"])
    scores = task.score(prompts, texts)
    out = []
    for i, row in enumerate(rows):
        comps = {k: v[i] for k, v in scores.items()}
        out.append({**row, "reward": sum(comps.values()), "components": comps})
    return out
