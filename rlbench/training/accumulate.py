"""The loss side of an update: micro-batches, gradient accumulation and mini-batches.

``accumulate_gradients`` runs an algorithm's loss over the micro-batches of one optimizer batch
and accumulates its gradient: each micro-batch's loss is its share of the batch loss (normalised
by whole-batch totals), so the sum over micro-batches is the whole batch's loss and gradient
whatever the micro-batch size. Each micro-batch's loss gets the step's context for exactly its
rows. Along the way it measures what every algorithm is logged with: the k3 KL to the reference,
the entropy, and the trainer–sampler logprob gap of the sampled tokens (the stale-weight check).
``mini_batches`` splits a batch into the shuffled parts of one epoch (PPO-style mini-batches).
"""
from __future__ import annotations

import torch

from rlbench.modeling import logprobs as lpmod
from rlbench import ops
from rlbench.types import Algorithm, StepContext, TrainBatch


def split_micro_batches(batch: TrainBatch, micro_batch_size: int, pairs: bool = False,
                        share_prompts: bool = True) -> list[TrainBatch]:
    """The micro-batches ``accumulate_gradients`` runs, in order."""
    if pairs:  # keep (chosen, rejected) rows together: original order, an even micro-batch size
        return list(batch.split(max(2, micro_batch_size - micro_batch_size % 2)))
    if share_prompts:  # a group's rows together (one prompt forward each), similar prompt lengths together
        return list(batch.sorted_by_length(prompt_only=True).split(micro_batch_size))
    return list(batch.sorted_by_length().split(micro_batch_size))  # similar lengths together: less padding


def accumulate_gradients(model, algorithm: Algorithm, batch: TrainBatch, micro_batch_size: int, ctx: StepContext,
                         backward=None, correction: ops.Correction | None = None, pairs: bool = False,
                         critic=None, share_prompts: bool = True, pad_to: int | None = None,
                         sampler_logprobs: torch.Tensor | None = None, temperature: float = 1.0) -> dict[str, float]:
    """Forward + backward over micro-batches; gradients accumulate in ``.grad``.

    ``ctx`` holds the step's per-row tensors for the rollouts rows that ``batch["row"]`` indexes
    (``TrainBatch.rows``); each micro-batch's loss gets the context of its own rows
    (``StepContext.select``), plus the critic's current values (``critic``) and, with a
    ``correction``, the off-policy weights of ``ops.behavior_weights`` against ``sampler_logprobs``
    as ``ctx.is_weights`` (``is/weight_mean``, ``is/masked_frac``). Returns the
    batch's loss and the algorithm's metrics (summed shares), the trainer's own ``kl`` (mean k3 to
    the reference over completion tokens, when reference logprobs are present), ``entropy``, and,
    given ``sampler_logprobs`` [rows, C] (the engine's, aligned like ``ctx``), the sync drift: the
    largest and mean |trainer − sampler| logprob of the sampled tokens (``sync/logprob_drift``,
    ``sync/logprob_drift_mean``) and the k3 estimate of KL(sampler ‖ trainer) per token
    (``behavior_kl``). A micro-batch whose loss is NaN/inf gets no backward and is
    counted as ``nonfinite_loss`` (the caller skips the update).

    ``pad_to`` (DeepSpeed, where every backward is a collective): every micro-batch gets a
    backward, non-finite ones included (``backward`` decides what to do with them), and the last
    micro-batch is run again with a zero loss until ``pad_to`` backwards were made, so all ranks
    make the same number.

    ``temperature``: logprobs and entropy are of π_T, the distribution the rollouts were sampled
    from (rlbench/modeling/logprobs.py); ``ctx``'s reference / old logprobs must be of π_T as well."""
    backward = backward or (lambda loss: loss.backward())
    totals: dict[str, float] = {"loss": 0.0}
    kl_sum = ent_sum = drift_sum = is_sum = masked_sum = behavior_kl_sum = 0.0
    drift_max = 0.0
    if "row" not in batch:  # a batch built by hand: rows 0..N−1 of the context
        batch = TrainBatch({**batch.tensors, "row": batch.rows()}, batch.totals, batch.metrics)
    micro_batches = split_micro_batches(batch, micro_batch_size, pairs, share_prompts)
    n_real = len(micro_batches)
    micro_batches += micro_batches[-1:] * max(0, (pad_to or 0) - n_real)
    for j, micro in enumerate(micro_batches):
        micro = micro.trimmed()
        C = micro["completion_mask"].shape[1]
        mctx = ctx.select(micro["row"], C)
        logp, ent = lpmod.token_logprobs(model, micro["input_ids"], micro["attention_mask"], C, with_entropy=True,
                                         share_prompts=share_prompts, temperature=temperature)  # [n, C] log π_T
        mask = micro["completion_mask"]
        if sampler_logprobs is not None:
            sampler = sampler_logprobs[micro["row"].to(sampler_logprobs.device)][:, :C].to(logp.device)  # [n, C]
            gap = (logp.detach() - sampler) * mask  # [n, C]
            drift_max = max(drift_max, gap.abs().max().item())
            drift_sum += gap.abs().sum().item()
            behavior_kl_sum += (ops.k3_kl(sampler, logp.detach()) * mask).sum().item()  # KL(behaviour ‖ π_θ)
            if correction is not None:  # decoupled: the proximal policy's logprobs, else the current ones
                now = mctx.old_logprobs.to(logp.device) if correction.mode == "decoupled" else logp
                mctx.is_weights, masked = correction.weights(now, sampler, mask)  # [n, C]
                is_sum += mctx.is_weights.sum().item()
                masked_sum += masked.sum().item()
        if critic is not None:  # the value model's predictions, with gradient, for the algorithm's value loss
            mctx.values = critic(micro["input_ids"], micro["attention_mask"], C)  # [n, C]
        loss, metrics = algorithm.loss(logp, micro, mctx)
        if j >= n_real:  # padding: a backward that adds nothing
            backward(loss * 0.0)
            continue
        if not torch.isfinite(loss):  # no backward (or DeepSpeed's); the trainer skips the update (on every rank)
            totals["nonfinite_loss"] = totals.get("nonfinite_loss", 0.0) + 1.0
            totals.setdefault("nonfinite_value", loss.item())
            if pad_to is not None:
                backward(loss)
            continue
        backward(loss)
        totals["loss"] += loss.item()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        ent_sum += (ent * mask).sum().item()
        if mctx.ref_logprobs is not None:
            kl_sum += (ops.k3_kl(logp.detach(), mctx.ref_logprobs) * mask).sum().item()
    totals["entropy"] = ent_sum / batch.totals["tokens"]
    if sampler_logprobs is not None:
        totals["sync/logprob_drift"] = drift_max
        totals["sync/logprob_drift_mean"] = drift_sum / batch.totals["tokens"]
        totals["behavior_kl"] = behavior_kl_sum / batch.totals["tokens"]
        if correction is not None:
            totals["is/weight_mean"] = is_sum / batch.totals["tokens"]
            if correction.mode != "truncate":
                totals["is/masked_frac"] = masked_sum / batch.totals["tokens"]
    if ctx.ref_logprobs is not None:
        totals["kl"] = kl_sum / batch.totals["tokens"]
    return totals


def mini_batches(batch: TrainBatch, mini: int, seed: int, pairs: bool = False):
    """The whole batch, or (``mini`` = M > 1) a shuffle of it by ``seed`` split into M parts, each
    with its own loss normalisers; preference pairs stay whole."""
    if mini <= 1 or batch.size < 2:
        yield batch
        return
    g = torch.Generator().manual_seed(seed)
    if pairs:
        order = torch.randperm(batch.size // 2, generator=g)  # [P]
        order = torch.stack([2 * order, 2 * order + 1], -1).reshape(-1)  # [2P] chosen, rejected, …
        chunks = [c.reshape(-1) for c in order.view(-1, 2).tensor_split(mini) if len(c)]
    else:
        chunks = [c for c in torch.randperm(batch.size, generator=g).tensor_split(mini) if len(c)]
    for rows in chunks:
        yield batch.select(rows.to(batch["input_ids"].device))
