"""The loss side of an update: micro-batches, gradient accumulation and mini-batches.

``accumulate_gradients`` runs an algorithm's loss over the micro-batches of one optimizer batch
and accumulates its gradient: each micro-batch's loss is its share of the batch loss (normalised
by whole-batch totals), so the sum over micro-batches is the whole batch's loss and gradient
whatever the micro-batch size. Each micro-batch's loss gets the step's context for exactly its
rows. Along the way it measures what every algorithm is logged with: the k3 KL to the reference
and the entropy; ``extras`` add to the context or measure beside the loss (``CriticValues``, the
trainer–sampler gap of ``SamplerGap``: the stale-weight check). ``MicroBatching`` is how a batch
is cut and run; ``mini_batches`` splits a batch into the shuffled parts of one epoch (PPO-style
mini-batches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rlbench.modeling import logprobs as lpmod
from rlbench import ops
from rlbench.types import Algorithm, StepContext, TrainBatch


@dataclass(frozen=True)
class MicroBatching:
    """How one optimizer batch is cut into micro-batches and run: the loss side's settings."""

    size: int  # rows per micro-batch (train.micro_batch_size)
    temperature: float = 1.0  # logprobs and entropy of π_T, the distribution the rollouts were sampled from
    pairs: bool = False  # keep (chosen, rejected) rows together: original order, an even size (DPO)
    share_prompts: bool = True  # a group's rows together, one prompt forward each (train.share_prompt_forward)
    pad_to: int | None = None  # DeepSpeed, where every backward is a collective: backwards every rank makes
    backward: Callable[[torch.Tensor], None] | None = None  # None: loss.backward()

    def split(self, batch: TrainBatch) -> list[TrainBatch]:
        """The micro-batches ``accumulate_gradients`` runs, in order."""
        if self.pairs:
            return list(batch.split(max(2, self.size - self.size % 2)))
        if self.share_prompts:  # similar prompt lengths together
            return list(batch.sorted_by_length(prompt_only=True).split(self.size))
        return list(batch.sorted_by_length().split(self.size))  # similar lengths together: less padding


class SamplerGap:
    """Against the engine's logprobs ``sampler`` [rows, C] (aligned like ``ctx``): the sync drift
    (largest and mean |trainer − sampler| logprob of the sampled tokens: ``sync/logprob_drift``,
    ``sync/logprob_drift_mean``), the k3 estimate of KL(sampler ‖ trainer) per token
    (``behavior_kl``) and, with a ``correction``, the off-policy weights of ``ops.behavior_weights``
    put into each micro-batch's ``ctx.is_weights`` (``is/weight_mean``, ``is/masked_frac``)."""

    def __init__(self, sampler: torch.Tensor, correction: ops.Correction | None = None):
        self.sampler, self.correction = sampler, correction
        self.drift_max = self.drift_sum = self.kl_sum = self.is_sum = self.masked_sum = 0.0

    def on_micro(self, micro: TrainBatch, mctx: StepContext, logp: torch.Tensor, counted: bool) -> None:
        C, mask = logp.shape[1], micro["completion_mask"]  # [n, C]
        sampler = self.sampler[micro["row"].to(self.sampler.device)][:, :C].to(logp.device)  # [n, C]
        if self.correction is not None:  # decoupled: the proximal policy's logprobs, else the current ones
            now = mctx.old_logprobs.to(logp.device) if self.correction.mode == "decoupled" else logp
            mctx.is_weights, masked = self.correction.weights(now, sampler, mask)  # [n, C]
        if not counted:  # a padding repeat (DeepSpeed) is measured once, as itself
            return
        self.add(logp.detach(), sampler, mask)
        if self.correction is not None:
            self.is_sum += mctx.is_weights.sum().item()
            self.masked_sum += masked.sum().item()

    def add(self, logp: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> None:
        """Count the gap between the trainer's ``logp`` and the sampler's logprobs of the same rows
        [n, C] (also ``Updater.sampling_metrics``' whole-batch pass)."""
        gap = (logp - sampler) * mask  # [n, C]
        self.drift_max = max(self.drift_max, gap.abs().max().item())
        self.drift_sum += gap.abs().sum().item()
        self.kl_sum += (ops.k3_kl(sampler, logp) * mask).sum().item()  # KL(behaviour ‖ π_θ)

    def totals(self, tokens: float) -> dict[str, float]:
        out = {"sync/logprob_drift": self.drift_max, "sync/logprob_drift_mean": self.drift_sum / tokens,
               "behavior_kl": self.kl_sum / tokens}
        if self.correction is not None:
            out["is/weight_mean"] = self.is_sum / tokens
            if self.correction.mode != "truncate":
                out["is/masked_frac"] = self.masked_sum / tokens
        return out


class CriticValues:
    """The value model's predictions, with gradient, in each micro-batch's ``ctx.values`` (for the
    algorithm's value loss)."""

    def __init__(self, critic):
        self.critic = critic

    def on_micro(self, micro: TrainBatch, mctx: StepContext, logp: torch.Tensor, counted: bool) -> None:
        mctx.values = self.critic(micro["input_ids"], micro["attention_mask"], logp.shape[1])  # [n, C]

    def totals(self, tokens: float) -> dict[str, float]:
        return {}


def accumulate_gradients(model, algorithm: Algorithm, batch: TrainBatch, ctx: StepContext, plan: MicroBatching,
                         extras: Sequence[SamplerGap | CriticValues] = ()) -> dict[str, float]:
    """Forward + backward over ``plan``'s micro-batches; gradients accumulate in ``.grad``.

    ``ctx`` holds the step's per-row tensors for the rollouts rows that ``batch["row"]`` indexes
    (``TrainBatch.with_rows``); each micro-batch's loss gets the context of its own rows
    (``StepContext.select``), completed by ``extras`` (the critic's values, the off-policy
    weights) before the loss. Returns the batch's loss and the algorithm's metrics (summed
    shares), the trainer's own ``kl`` (mean k3 to the reference over completion tokens, when
    reference logprobs are present), ``entropy``, and what each of ``extras`` measured. A
    micro-batch whose loss is NaN/inf gets no backward and is counted as ``nonfinite_loss`` (the
    caller skips the update).

    ``plan.pad_to`` (DeepSpeed): every micro-batch gets a backward, non-finite ones included
    (``plan.backward`` decides what to do with them), and the last micro-batch is run again with a
    zero loss until ``pad_to`` backwards were made, so all ranks make the same number."""
    backward = plan.backward or (lambda loss: loss.backward())
    totals: dict[str, float] = {"loss": 0.0}
    kl_sum = ent_sum = 0.0
    micro_batches = plan.split(batch.with_rows())
    n_real = len(micro_batches)
    micro_batches += micro_batches[-1:] * max(0, (plan.pad_to or 0) - n_real)
    for j, micro in enumerate(micro_batches):
        micro, counted = micro.trimmed(), j < n_real
        C, mask = micro["completion_mask"].shape[1], micro["completion_mask"]  # [n, C]
        mctx = ctx.select(micro["row"], C)
        logp, ent = lpmod.token_logprobs(model, micro["input_ids"], micro["attention_mask"], C, with_entropy=True,
                                         share_prompts=plan.share_prompts, temperature=plan.temperature)  # [n, C] log π_T
        for extra in extras:
            extra.on_micro(micro, mctx, logp, counted)
        loss, metrics = algorithm.loss(logp, micro, mctx)
        if not counted:  # padding: a backward that adds nothing
            backward(loss * 0.0)
            continue
        if not torch.isfinite(loss):  # no backward (or DeepSpeed's); the trainer skips the update (on every rank)
            totals["nonfinite_loss"] = totals.get("nonfinite_loss", 0.0) + 1.0
            totals.setdefault("nonfinite_value", loss.item())
            if plan.pad_to is not None:
                backward(loss)
            continue
        backward(loss)
        totals["loss"] += loss.item()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        ent_sum += (ent * mask).sum().item()
        if mctx.ref_logprobs is not None:
            kl_sum += (ops.k3_kl(logp.detach(), mctx.ref_logprobs) * mask).sum().item()
    tokens = batch.totals["tokens"]
    totals["entropy"] = ent_sum / tokens
    if ctx.ref_logprobs is not None:
        totals["kl"] = kl_sum / tokens
    for extra in extras:
        totals.update(extra.totals(tokens))
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
