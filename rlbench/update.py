"""The policy's compute on one step's batch: the no-grad passes before ``prepare`` (reference,
old-policy and critic values) and the update after it.

An update is ``Needs.epochs`` μ passes over the batch, each split into ``Needs.mini_batches``
mini-batches (a fresh seeded shuffle per epoch, preference pairs kept whole), one optimizer step
per mini-batch. A mini-batch's loss normalisers are summed over ranks first, so every rank's loss
is its share of the global mini-batch's; its micro-batches accumulate gradients
(``accumulate_gradients``: a micro-batch's loss shares sum to the mini-batch loss exactly). Then a
stepper reduces and steps: ``PlainStepper`` sums the gradients over ranks once, clips and steps
AdamW; ``ZeroStepper`` hands that to DeepSpeed (rlbench/zero.py). The first update of a step is
checked against the sampler (the stale-weight check); a non-finite loss or gradient norm raises
``NonFiniteError`` after the stepper has done what it must (DeepSpeed steps to discard the
poisoned gradients; plain training does not step at all).
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager

import torch

from rlbench import dist, ops
from rlbench import logprobs as lpmod
from rlbench.faults import NonFiniteError, batch_payload, stale_weights
from rlbench.types import StepContext, TrainBatch, shuffle_seed


def split_micro_batches(batch: TrainBatch, micro_batch_size: int, pairs: bool = False,
                        share_prompts: bool = True) -> list[TrainBatch]:
    """The micro-batches ``accumulate_gradients`` runs, in order."""
    if pairs:  # keep (chosen, rejected) rows together: original order, an even micro-batch size
        return list(batch.split(max(2, micro_batch_size - micro_batch_size % 2)))
    if share_prompts:  # a group's rows together (one prompt forward each), similar prompt lengths together
        return list(batch.sorted_by_length(prompt_only=True).split(micro_batch_size))
    return list(batch.sorted_by_length().split(micro_batch_size))  # similar lengths together: less padding


def accumulate_gradients(model, algorithm, batch: TrainBatch, micro_batch_size: int, ctx: StepContext,
                         backward=None, is_cap: float | None = None, pairs: bool = False,
                         critic=None, share_prompts: bool = True, pad_to: int | None = None,
                         sampler_logprobs: torch.Tensor | None = None) -> dict[str, float]:
    """Forward + backward over micro-batches; gradients accumulate in ``.grad``.

    ``ctx`` holds the step's per-row tensors for the rollouts rows that ``batch["row"]`` indexes
    (``TrainBatch.rows``); each micro-batch's loss gets the context of its own rows
    (``StepContext.select``), plus the critic's current values (``critic``) and, with ``is_cap``,
    the truncated importance weights min(π_θ/π_sampler, is_cap) as ``ctx.is_weights``. Returns the
    batch's loss and the algorithm's metrics (summed shares), the trainer's own ``kl`` (mean k3 to
    the reference over completion tokens, when reference logprobs are present), ``entropy``, and,
    given ``sampler_logprobs`` [rows, C] (the engine's, aligned like ``ctx``), the sync drift: the
    largest and mean |trainer − sampler| logprob of the sampled tokens (``sync/logprob_drift``,
    ``sync/logprob_drift_mean``). A micro-batch whose loss is NaN/inf gets no backward and is
    counted as ``nonfinite_loss`` (the caller skips the update).

    ``pad_to`` (DeepSpeed, where every backward is a collective): every micro-batch gets a
    backward, non-finite ones included (``backward`` decides what to do with them), and the last
    micro-batch is run again with a zero loss until ``pad_to`` backwards were made, so all ranks
    make the same number."""
    backward = backward or (lambda loss: loss.backward())
    totals: dict[str, float] = {"loss": 0.0}
    kl_sum = ent_sum = drift_sum = is_sum = 0.0
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
                                         share_prompts=share_prompts)
        mask = micro["completion_mask"]
        if sampler_logprobs is not None:
            sampler = sampler_logprobs[micro["row"].to(sampler_logprobs.device)][:, :C].to(logp.device)  # [n, C]
            gap = (logp.detach() - sampler) * mask  # [n, C]
            drift_max = max(drift_max, gap.abs().max().item())
            drift_sum += gap.abs().sum().item()
            if is_cap is not None:
                mctx.is_weights = torch.exp(gap).clamp(max=is_cap) * mask  # [n, C]
                is_sum += mctx.is_weights.sum().item()
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
        if is_cap is not None:
            totals["is/weight_mean"] = is_sum / batch.totals["tokens"]
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


# -- reductions over ranks ---------------------------------------------------------------------------

def global_totals(mb: TrainBatch) -> TrainBatch:
    """The loss normalisers summed over ranks: each rank's loss is its share of the global batch's."""
    if not dist.active():
        return mb
    keys = [k for k in ("seqs", "tokens", "pairs") if k in mb.totals]
    totals = dict(mb.totals)
    totals.update(zip(keys, dist.sum_floats([mb.totals[k] for k in keys])))
    return TrainBatch(mb.tensors, totals, mb.metrics)


def sum_over_ranks(d: dict) -> dict:
    keys = sorted(set().union(*dist.gather_objects(sorted(d))))  # ranks may hold different keys
    return dict(zip(keys, dist.sum_floats([float(d.get(k, 0.0)) for k in keys])))


def reduce_train_metrics(m: dict) -> dict:
    """accumulate_gradients' values are shares of global-batch means: summed over ranks; the sync
    drift's maximum is a maximum. Every rank sends the same keys (union, zeros filled)."""
    if not dist.active():
        return m
    summed = sum_over_ranks(m)
    if "sync/logprob_drift" in summed:
        summed["sync/logprob_drift"] = dist.max_floats([m.get("sync/logprob_drift", 0.0)])[0]
    if "nonfinite_value" in summed:
        summed["nonfinite_value"] = float("nan")
    return summed


# -- one optimizer step -------------------------------------------------------------------------------

class PlainStepper:
    """Gradients summed over ranks once (DDP's per-backward all-reduce is off), clipped, AdamW."""

    def __init__(self, accelerator, model, optimizer, critic, max_grad_norm: float):
        self.accelerator, self.model, self.optimizer, self.critic = accelerator, model, optimizer, critic
        self.max_grad_norm = max_grad_norm

    def backward(self, mb: TrainBatch):
        """(backward function, pad_to) for the micro-batches of one optimizer step's mini-batch."""
        return self.accelerator.backward, None

    @contextmanager
    def no_sync(self):
        with ExitStack() as stack:
            if dist.active():
                stack.enter_context(self.accelerator.no_sync(self.model))
                if self.critic is not None:
                    stack.enter_context(self.accelerator.no_sync(self.critic))
            yield

    def step(self, skip: bool) -> tuple[float, bool, float]:
        """(gradient norm before clipping, applied, seconds of clip + optimizer step). ``skip``: a
        non-finite loss; nothing is reduced or applied."""
        if skip:
            return float("nan"), False, 0.0
        params = list(self.model.parameters()) + (list(self.critic.parameters()) if self.critic else [])
        dist.sum_gradients(params)
        t = time.perf_counter()  # the gradient sum over ranks excluded
        grad_norm = float(self.accelerator.clip_grad_norm_(params, self.max_grad_norm))
        if not math.isfinite(grad_norm):
            return grad_norm, False, time.perf_counter() - t
        self.optimizer.step()
        return grad_norm, True, time.perf_counter() - t


class ZeroStepper(PlainStepper):
    """DeepSpeed reduces, clips and steps, or discards NaN/inf gradients (rlbench/zero.py); every
    rank makes the same number of backwards."""

    def __init__(self, zero, micro_batch_size: int, pairs: bool, share_prompts: bool):
        self.zero, self.micro_batch_size, self.pairs, self.share_prompts = zero, micro_batch_size, pairs, share_prompts

    def backward(self, mb: TrainBatch):
        n_micro = len(split_micro_batches(mb, self.micro_batch_size, self.pairs, self.share_prompts))
        pad_to = int(dist.max_floats([float(n_micro)])[0])  # the most micro-batches of any rank
        return self.zero.backward_fn(pad_to), pad_to

    @contextmanager
    def no_sync(self):
        yield

    def step(self, skip: bool) -> tuple[float, bool, float]:
        t = time.perf_counter()
        grad_norm, applied = self.zero.step()  # also when skipping: DeepSpeed must discard the poisoned step
        return grad_norm, applied and not skip, time.perf_counter() - t


class Updater:
    """No-grad passes and the update of one step (see the module docstring)."""

    def __init__(self, cfg, needs, algorithm, model, optimizer, scheduler, critic, reference, weights, stepper,
                 meter, max_drift: float, device):
        self.cfg, self.needs, self.algorithm = cfg, needs, algorithm
        self.model, self.optimizer, self.scheduler, self.critic = model, optimizer, scheduler, critic
        self.reference, self.weights, self.stepper, self.meter = reference, weights, stepper, meter
        self.max_drift, self.device = max_drift, device
        self.applied = 0  # optimizer steps applied in the current step

    @torch.no_grad()
    def score(self, rollouts, ctx: StepContext) -> None:
        """Fill ``ctx`` before ``prepare``: reference logprobs (the algorithm's, or ``eval.kl``'s
        logged KL), old-policy logprobs (μ > 1 or mini-batches), the critic's values [N, C]."""
        cfg, mb = self.cfg, self.cfg.train.micro_batch_size
        inputs = {k: v.to(self.device) for k, v in rollouts.model_inputs().items()}
        C, tokens = rollouts.completion_ids.shape[1], inputs["attention_mask"].sum().item()
        if self.needs.reference or cfg.eval.kl:
            ctx.ref_logprobs = lpmod.batched_logprobs(self.reference, inputs["input_ids"], inputs["attention_mask"], C,
                                                      mb, cfg.train.share_prompt_forward).cpu()  # [N, C]
            self.meter.count("tokens/reference", tokens)
        if self.needs.old_logprobs:
            self.meter.count("tokens/old_logprobs", tokens)
            self.model.eval()
            ctx.old_logprobs = lpmod.batched_logprobs(self.weights.whole, inputs["input_ids"], inputs["attention_mask"],
                                                      C, mb, cfg.train.share_prompt_forward).cpu()  # [N, C]
        if self.critic is not None:
            self.meter.count("tokens/critic", tokens)
            self.critic.eval()
            ctx.values = torch.cat([self.critic(inputs["input_ids"][i:i + mb], inputs["attention_mask"][i:i + mb], C)
                                    for i in range(0, rollouts.n, mb)]).cpu()  # [N, C]

    def update(self, batch: TrainBatch, ctx: StepContext, step: int, rollouts, rewards) -> dict:
        """μ epochs × M mini-batches of optimizer steps; returns the sampling policy's metrics (the
        first epoch's mean; the sync drift from its first mini-batch, which precedes any update)."""
        cfg, needs = self.cfg, self.needs
        self.model.train()
        if self.critic is not None:
            self.critic.train()
        first: list[dict] = []
        for epoch in range(needs.epochs):
            ctx.epoch = epoch
            for i, mb in enumerate(mini_batches(batch, needs.mini_batches, shuffle_seed(cfg.run.seed, step, epoch),
                                                needs.pairs)):
                self.optimizer.zero_grad(set_to_none=True)
                mb = global_totals(mb)
                backward, pad_to = self.stepper.backward(mb)
                with self.stepper.no_sync():  # gradients are reduced over ranks once, by the stepper
                    m = accumulate_gradients(self.model, self.algorithm, mb, cfg.train.micro_batch_size, ctx,
                                             backward=backward,
                                             is_cap=cfg.rollout.is_cap if cfg.rollout.is_correction else None,
                                             pairs=needs.pairs, critic=self.critic,
                                             share_prompts=cfg.train.share_prompt_forward, pad_to=pad_to,
                                             sampler_logprobs=rollouts.logprobs)
                m = reduce_train_metrics(m)
                if epoch == 0 and i == 0 and m.get("sync/logprob_drift", 0.0) > self.max_drift:
                    self.optimizer.zero_grad(set_to_none=True)  # the first update must start from the sampling weights
                    raise stale_weights(step, m["sync/logprob_drift"], m["sync/logprob_drift_mean"], self.max_drift)
                bad_loss = m.get("nonfinite_loss", 0.0) > 0
                grad_norm, applied, seconds = self.stepper.step(skip=bad_loss)
                if bad_loss:
                    raise NonFiniteError("loss", step, f"{m.get('nonfinite_value', float('nan'))}",
                                         batch_payload(rollouts, rewards, mb, epoch, i))
                if not applied or not math.isfinite(grad_norm):
                    raise NonFiniteError("gradient norm", step, f"{grad_norm}", batch_payload(rollouts, rewards, mb, epoch, i))
                self.scheduler.step()
                self.meter.add_time("optimizer", seconds, run=False)  # part of time/train
                self.applied += 1
                clipped = float(grad_norm > cfg.train.max_grad_norm)
                self.meter.counters["grad/clipped"] += clipped
                m.update(grad_norm=grad_norm, grad_clipped=clipped)
                if epoch == 0:
                    first.append(m)
        metrics = {k: sum(m.get(k, 0.0) for m in first) / len(first) for k in first[0]}
        metrics.update({k: v for k, v in first[0].items() if k.startswith("sync/")})
        self.meter.count("tokens/trained", batch["attention_mask"].sum().item() * needs.epochs)
        return metrics
