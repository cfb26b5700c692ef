"""The policy's compute on one step's batch: the no-grad passes before ``prepare`` (reference,
old-policy and critic values) and the update after it.

An update is ``Needs.epochs`` μ passes over the batch, each split into ``Needs.mini_batches``
mini-batches (a fresh seeded shuffle per epoch, preference pairs kept whole), one optimizer step
per mini-batch. A mini-batch's loss normalisers are summed over ranks first, so every rank's loss
is its share of the global mini-batch's; its micro-batches accumulate gradients
(rlbench/training/accumulate.py: a micro-batch's loss shares sum to the mini-batch loss exactly). Then a
stepper reduces and steps: ``PlainStepper`` sums the gradients over ranks once, clips and steps
AdamW; ``ZeroStepper`` hands that to DeepSpeed (rlbench/training/zero.py). The first update of a step is
checked against the sampler (the stale-weight check); a non-finite loss or gradient norm raises
``NonFiniteError`` after the stepper has done what it must (DeepSpeed steps to discard the
poisoned gradients; plain training does not step at all).
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch

from rlbench import ops
from rlbench.training import dist
from rlbench.modeling import logprobs as lpmod
from rlbench.training.accumulate import CriticValues, MicroBatching, SamplerGap, accumulate_gradients, mini_batches
from rlbench.training.faults import NonFiniteError, batch_payload, stale_weights
from rlbench.seeds import shuffle_seed
from rlbench.types import StepContext, TrainBatch

if TYPE_CHECKING:
    from rlbench.config import RolloutConfig, TrainConfig
    from rlbench.training.setup import Setup


# -- reductions over ranks ---------------------------------------------------------------------------

def global_totals(batch: TrainBatch) -> TrainBatch:
    """The loss normalisers summed over ranks: each rank's loss is its share of the global batch's."""
    if not dist.active():
        return batch
    keys = [k for k in ("seqs", "tokens", "pairs") if k in batch.totals]
    totals = dict(batch.totals)
    totals.update(zip(keys, dist.sum_floats([batch.totals[k] for k in keys])))
    return TrainBatch(batch.tensors, totals, batch.metrics)


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

    def plan(self, mini_batch: TrainBatch, plan: MicroBatching) -> MicroBatching:
        """How the micro-batches of one optimizer step's mini-batch get their backward."""
        return dataclasses.replace(plan, backward=self.accelerator.backward)

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
    """DeepSpeed reduces, clips and steps, or discards NaN/inf gradients (rlbench/training/zero.py); every
    rank makes the same number of backwards."""

    def __init__(self, zero):
        self.zero = zero

    def plan(self, mini_batch: TrainBatch, plan: MicroBatching) -> MicroBatching:
        pad_to = int(dist.max_floats([float(len(plan.split(mini_batch)))])[0])  # the most micro-batches of any rank
        return dataclasses.replace(plan, backward=self.zero.backward_fn(pad_to), pad_to=pad_to)

    @contextmanager
    def no_sync(self):
        yield

    def step(self, skip: bool) -> tuple[float, bool, float]:
        t = time.perf_counter()
        grad_norm, applied = self.zero.step()  # also when skipping: DeepSpeed must discard the poisoned step
        return grad_norm, applied and not skip, time.perf_counter() - t


class Updater:
    """No-grad passes and the update of one step (see the module docstring)."""

    def __init__(self, s: Setup, stepper, meter, train: TrainConfig, rollout: RolloutConfig, eval_kl: bool):
        self.needs, self.algorithm, self.stepper, self.meter = s.needs, s.algorithm, stepper, meter
        self.model, self.optimizer, self.scheduler, self.critic = s.model, s.optimizer, s.scheduler, s.critic
        self.reference, self.weights, self.max_drift, self.device = s.reference, s.weights, s.max_drift, s.device
        self.teacher = s.teacher
        self.seed, self.max_grad_norm, self.max_tokens = s.seed, train.max_grad_norm, rollout.max_tokens
        self.with_reference = s.needs.reference or eval_kl  # eval.kl logs the KL of algorithms without one
        # logprobs of π_T, the distribution the rollouts were sampled from (rlbench/modeling/logprobs.py);
        # offline data (needs.offline) and references (needs.gold_rollouts) were not sampled: the
        # model's own distribution, T = 1
        self.plan = MicroBatching(train.micro_batch_size, temperature=1.0 if s.needs.offline or s.needs.gold_rollouts
                                  else rollout.temperature,
                                  pairs=s.needs.pairs, share_prompts=train.share_prompt_forward)
        self._before = None  # score's no-grad pass of the sampling weights: (logprobs, entropy) [N, C]
        self.applied = 0  # optimizer steps applied in the current step
        r = rollout
        self.correction = ops.Correction(r.is_correction, r.is_cap, r.is_low, r.is_level) \
            if r.is_correction != "none" else None
        # asynchronous rollouts: the batch comes from older weights by design, so the sampler is
        # checked at every push instead (rlbench/training/async_rollouts.py)
        self.on_policy = r.off_policy_steps == 0

    @property
    def steps_per_update(self) -> int:
        """Optimizer steps in one step's update: μ epochs × M mini-batches."""
        return self.needs.epochs * self.needs.mini_batches

    @torch.no_grad()
    def score(self, rollouts, step: int) -> StepContext:
        """The step's context before ``prepare``: reference logprobs (the algorithm's, or
        ``eval.kl``'s logged KL), old-policy logprobs (μ > 1, mini-batches, or the proximal policy
        of the decoupled correction), a frozen teacher's (``Needs.teacher``), the critic's values, the sampler's logprobs [N, C]; all of
        π_T (``self.plan.temperature``). When the update takes several optimizer steps, the no-grad
        pass of the sampling weights also gives the step's sampling-policy metrics (``update``)."""
        ctx = StepContext(step=step, max_tokens=self.max_tokens, sampler_logprobs=rollouts.sampler_logprobs)
        micro, T, share = self.plan.size, self.plan.temperature, self.plan.share_prompts
        inputs = {k: v.to(self.device) for k, v in rollouts.model_inputs().items()}
        C, tokens = rollouts.completion_ids.shape[1], inputs["attention_mask"].sum().item()
        self._before = None
        if self.with_reference:
            ctx.ref_logprobs = lpmod.batched_logprobs(self.reference, inputs, C,
                                                      micro, share, temperature=T).cpu()  # [N, C]
            self.meter.count("tokens/reference", tokens)
        if self.teacher is not None:  # Needs.teacher: the same tokens through the frozen teacher (opd)
            ctx.teacher_logprobs = lpmod.batched_logprobs(self.teacher, inputs, C, micro, share, temperature=T).cpu()  # [N, C]
            self.meter.count("tokens/teacher", tokens)
        asked = self.needs.old_logprobs or (self.correction is not None and self.correction.mode == "decoupled")
        if asked or self.steps_per_update > 1:
            self.meter.count("tokens/old_logprobs", tokens)
            self.model.eval()
            old, ent = lpmod.batched_logprobs(self.weights.whole, inputs, C, micro,
                                              share, temperature=T, with_entropy=True)
            self._before = (old.cpu(), ent.cpu())  # [N, C] each: the sampling weights, before any update
            if asked:
                ctx.old_logprobs = self._before[0]
        if self.critic is not None:
            self.meter.count("tokens/critic", tokens)
            self.critic.eval()
            ctx.values = torch.cat([self.critic(inputs["input_ids"][i:i + micro], inputs["attention_mask"][i:i + micro], C)
                                    for i in range(0, rollouts.n, micro)]).cpu()  # [N, C]
        return ctx

    def sampling_metrics(self, batch: TrainBatch, ctx: StepContext, sampler_logprobs) -> dict[str, float]:
        """The sampling policy's metrics over the whole batch from ``score``'s no-grad pass, before
        any optimizer step: ``kl`` (k3 to the reference), ``entropy``, and against the engine's
        logprobs the sync drift and ``behavior_kl`` — each a share of the global batch's mean (the
        same definitions as ``accumulate_gradients``')."""
        old, ent = self._before
        rows, C = batch["row"].cpu(), batch["completion_mask"].shape[1]
        mask = batch["completion_mask"].cpu().float()  # [n, C]
        old, ent = old[rows][:, :C], ent[rows][:, :C]  # [n, C]
        tokens = batch.totals["tokens"]
        m = {"entropy": (ent * mask).sum().item() / tokens}
        if ctx.ref_logprobs is not None:
            ref = ctx.ref_logprobs.cpu()[rows][:, :C]  # [n, C]
            m["kl"] = (ops.k3_kl(old, ref) * mask).sum().item() / tokens
        if sampler_logprobs is not None:  # the same counts as the update's, over the whole batch at once
            gap = SamplerGap(sampler_logprobs)
            gap.add(old, sampler_logprobs.cpu()[rows][:, :C], mask)
            m.update(gap.totals(tokens))
        return m

    def _check_drift(self, m: dict, step: int) -> dict:
        """The stale-weight check (synchronous rollouts) or, with a fixed lag, the gap renamed as the lag's."""
        behavior_kl = m.pop("behavior_kl", None)
        if not self.on_policy:  # the trainer-sampler gap is the lag here, not a sync fault
            m["offpolicy/behavior_kl"] = behavior_kl or 0.0
            m["offpolicy/logprob_gap_max"] = m.pop("sync/logprob_drift", 0.0)
            m["offpolicy/logprob_gap_mean"] = m.pop("sync/logprob_drift_mean", 0.0)
        elif m.get("sync/logprob_drift", 0.0) > self.max_drift:
            self.optimizer.zero_grad(set_to_none=True)  # the first update must start from the sampling weights
            raise stale_weights(step, m["sync/logprob_drift"], m["sync/logprob_drift_mean"], self.max_drift)
        return m

    def update(self, batch: TrainBatch, ctx: StepContext, step: int, rollouts, rewards) -> dict:
        """μ epochs × M mini-batches of optimizer steps. Returns the step's metrics:

        * of the sampling policy (``SAMPLING_METRICS``: ``kl``, ``entropy``, the sync drift, the
          off-policy gap): over the whole batch, with the weights that sampled it — from the one
          update's forward when the update is a single optimizer step, else from ``score``'s no-grad
          pass; never from a forward after an optimizer step;
        * measured during the update (``loss``, ``clip_frac``, ``grad_norm``, ``grad_clipped``, value
          loss, the algorithm's loss metrics, ``is/*``): the mean over all of the step's optimizer
          steps (every epoch and mini-batch).

        An empty batch on every rank (an algorithm that kept no row) applies no update: no optimizer
        or scheduler step, ``update/empty`` counted, no sampling-policy metric logged."""
        needs = self.needs
        if dist.sum_floats([float(batch.size)])[0] == 0:  # nothing to train on (rft: no completion accepted)
            self.meter.counters["update/empty"] += 1
            return {"update/empty": 1.0}
        self.model.train()
        if self.critic is not None:
            self.critic.train()
        batch = batch.with_rows()
        before = None
        if self.steps_per_update > 1:
            before = self._check_drift(reduce_train_metrics(
                self.sampling_metrics(global_totals(batch), ctx, rollouts.sampler_logprobs)), step)
        done: list[dict] = []
        for epoch in range(needs.epochs):
            ctx.epoch = epoch
            for i, mini in enumerate(mini_batches(batch, needs.mini_batches, shuffle_seed(self.seed, step, epoch),
                                                  needs.pairs)):
                self.optimizer.zero_grad(set_to_none=True)
                mini = global_totals(mini)
                extras = ([SamplerGap(rollouts.sampler_logprobs, self.correction)]
                          if rollouts.sampler_logprobs is not None else [])
                extras += [CriticValues(self.critic)] if self.critic is not None else []
                with self.stepper.no_sync():  # gradients are reduced over ranks once, by the stepper
                    m = accumulate_gradients(self.model, self.algorithm, mini, ctx, self.stepper.plan(mini, self.plan),
                                             extras)
                m = reduce_train_metrics(m)
                if before is None:  # the one optimizer step: its forward is the sampling weights'
                    m = self._check_drift(m, step)
                else:
                    for k in SAMPLING_METRICS:
                        m.pop(k, None)
                bad_loss = m.get("nonfinite_loss", 0.0) > 0
                grad_norm, applied, seconds = self.stepper.step(skip=bad_loss)
                if bad_loss:
                    raise NonFiniteError("loss", step, f"{m.get('nonfinite_value', float('nan'))}",
                                         batch_payload(rollouts, rewards, mini, epoch, i))
                if not applied or not math.isfinite(grad_norm):
                    raise NonFiniteError("gradient norm", step, f"{grad_norm}",
                                         batch_payload(rollouts, rewards, mini, epoch, i))
                self.scheduler.step()
                self.meter.add_time("optimizer", seconds, run=False)  # part of time/train
                self.applied += 1
                clipped = float(grad_norm > self.max_grad_norm)
                self.meter.counters["grad/clipped"] += clipped
                m.update(grad_norm=grad_norm, grad_clipped=clipped)
                done.append(m)
        keys = dict.fromkeys(k for m in done for k in m)
        metrics = {k: sum(m.get(k, 0.0) for m in done) / len(done) for k in keys}
        sampling = before if before is not None else {k: done[0][k] for k in keys if k in _SAMPLING_KEYS}
        metrics.update(sampling)
        self.meter.count("tokens/trained", batch["attention_mask"].sum().item() * needs.epochs)
        return metrics


# Measured on the sampling weights before any optimizer step (``Updater.update``); the rest of a
# step's metrics are means over its optimizer steps.
SAMPLING_METRICS = ("kl", "entropy", "sync/logprob_drift", "sync/logprob_drift_mean", "behavior_kl")
_SAMPLING_KEYS = set(SAMPLING_METRICS) | {"offpolicy/behavior_kl", "offpolicy/logprob_gap_max",
                                          "offpolicy/logprob_gap_mean"}
