"""One step's line of metrics.jsonl, assembled from what the step's phases returned.

In a multi-process run every figure covers the global batch: reward and length statistics are
computed over every rank's completions (gathered), the algorithm's batch metrics are the mean of
the ranks' values, sampling counts are summed (rounds: the most any rank needed), the train
metrics arrive already reduced (``update.reduce_train_metrics``), and a float64 checksum of the
weights is compared over ranks (``dist/param_checksum_spread``, 0 when the replicas agree).
"""
from __future__ import annotations

import torch

from rlbench.training import dist
from rlbench.training.update import sum_over_ranks


def gathered(sample) -> tuple[dict, torch.Tensor, list]:
    """Reward components, completion lengths and finish reasons of every rank's ``sample.sampled``."""
    components, lengths, finish = sample.components, sample.sampled.lengths(), list(sample.sampled.finish_reasons)
    if not dist.active():
        return components, lengths, finish
    parts = dist.gather_objects(({k: v.tolist() for k, v in components.items()}, lengths.tolist(), finish))
    return ({k: torch.tensor([x for p in parts for x in p[0][k]]) for k in components},
            torch.tensor([x for p in parts for x in p[1]]), [f for p in parts for f in p[2]])


def over_ranks(batch_metrics: dict, sample_metrics: dict) -> tuple[dict, dict]:
    """The algorithm's batch metrics (mean of ranks) and the sampling counts (sums; rounds: max;
    per-trajectory means and shares: mean of ranks)."""
    world = dist.world_size()
    if world == 1:
        return batch_metrics, sample_metrics
    batch_metrics = {k: v / world for k, v in sum_over_ranks(batch_metrics).items()}
    rounds = dist.max_floats([sample_metrics.get("sampling/rounds", 0.0)])[0]
    sample_metrics = sum_over_ranks(sample_metrics)
    if "sampling/rounds" in sample_metrics:
        sample_metrics["sampling/rounds"] = rounds
    for k in sample_metrics:  # per-trajectory means and shares (env/turns_mean, …): every rank has as many
        if k.endswith(("_mean", "_frac")):
            sample_metrics[k] /= world
    return batch_metrics, sample_metrics


def record(step: int, sample, train_metrics: dict, batch_metrics: dict, meter, weights) -> dict:
    """The step's metrics (before the event hooks' and the algorithm's ``after_step`` are added).
    ``train_metrics``: the update's (and the learning rate); ``batch_metrics``: ``prepare``'s. Call
    after ``meter.flush()``: token totals are then global, ``meter.flushed`` this step's."""
    components, lengths, finish = gathered(sample)
    batch_metrics, sample_metrics = over_ranks(batch_metrics, sample.metrics)
    total_reward = torch.stack(list(components.values())).sum(0) if components else None  # [N sampled]
    metrics = {
        "step": step,
        **({"reward/mean": total_reward.mean().item(),
            "reward/std": total_reward.std().item() if total_reward.numel() > 1 else 0.0} if components else {}),
        **{f"reward/{k}": v.mean().item() for k, v in components.items()},
        **train_metrics,
        **batch_metrics,
        **sample_metrics,
        "completion_len/mean": lengths.float().mean().item(),
        "completion_len/max": lengths.max().item(),
        "truncated_frac": sum(f == "length" for f in finish) / len(finish),
        **{f"time/{k}": v for k, v in meter.last.items()},
        "tokens/generated": 0.0 if sample.offline else float(lengths.sum().item()),
        "tokens/generated_total": meter.counters["tokens/generated"],
        "tokens/trained": meter.flushed.get("tokens/trained", 0.0),  # prompt + completion, all epochs
        # run totals on the budgets' axes (the timed ones under time_spent/: they differ between reruns)
        **{(f"spent/{k}" if k in ("flops", "tokens") else f"time_spent/{k}"): v for k, v in meter.spent().items()},
        **meter.fault_totals(),
    }
    if dist.active():  # replicas must hold the same weights: a float64 checksum, compared over ranks
        with torch.no_grad():
            c = sum((p.double().sum() + p.double().square().sum()).item() for p in weights.whole.parameters())
        spread = dist.max_floats([c, -c])
        metrics["dist/param_checksum_spread"] = spread[0] + spread[1]  # max − min
        metrics["dist/world_size"] = float(dist.world_size())
    return metrics
