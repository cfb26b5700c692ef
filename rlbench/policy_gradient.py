"""The stateful side of the shared maths: the adaptive KL controller, one for every algorithm that
keeps a KL coefficient (PPO and the clipped-surrogate family), and the clipped-surrogate family
(grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp, cispo) built from ``rlbench.ops``.

Metric names: the family's shared metrics are ``pg/*``; the controller's coefficient is
``kl_coef`` for every algorithm that has one (renamed from ``grpo/*`` and ``grpo/beta`` /
``ppo/beta``; README, metrics). Not here: DPO's β, which is not a KL coefficient a controller
moves but the scale of its implicit reward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlbench.ops import LOSS_AGGS, aggregate, clipped_surrogate, group_advantages, k3_kl
from rlbench.types import AlgorithmBase, Needs, Rollouts, StepContext, TrainBatch


class AdaptiveKL:
    """β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) / horizon), once per step (Ziegler et al. 2019);
    ``target`` 0 keeps β fixed. A NaN/inf KL leaves β as it is."""

    def __init__(self, beta: float, target: float, horizon: float):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float) -> float:
        if self.target > 0 and math.isfinite(kl):
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err / self.horizon
        return self.beta


class KLControlled(AlgorithmBase):
    """An algorithm with a KL coefficient: ``self.kl_ctl`` built from the config's ``beta``,
    ``kl_target`` and ``kl_horizon``, moved once per step by the step's sampling-policy ``kl``,
    logged as ``kl_coef`` and kept in checkpoints."""

    def __init__(self, config):
        self.config = config
        self.kl_ctl = AdaptiveKL(config.beta, config.kl_target, config.kl_horizon)

    def after_step(self, metrics: dict) -> dict:
        """Called once per step with the step's metrics (``kl``: the sampling policy's, measured
        before any optimizer step)."""
        return {"kl_coef": self.kl_ctl.update(metrics.get("kl", float("nan")))}

    def state_dict(self) -> dict:
        return {"beta": self.kl_ctl.beta}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.beta = state["beta"]


# -- the clipped-surrogate family ------------------------------------------------------------------

@dataclass
class PolicyGradientConfig:
    """Options shared by the clipped-surrogate family."""

    beta: float = 0.04  # KL coefficient (initial value when adaptive)
    kl_target: float = 0.0  # > 0: adaptive β toward this per-token KL (Ziegler et al. controller)
    kl_horizon: float = 10.0  # adaptive controller horizon, in steps
    epsilon_low: float = 0.2  # clip range below 1
    epsilon_high: float = 0.2  # clip range above 1 (DAPO raises it to 0.28)
    loss_agg: str = "seq_mean"  # seq_mean (DeepSeekMath) | token_mean (DAPO) | constant_length (Dr. GRPO)
    epochs: int = 1  # μ: passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass: the batch is shuffled and split (verl's ppo_mini_batch_size)

    def validate(self):
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGS)}; got {self.loss_agg!r}")
        if self.beta < 0 or self.kl_target < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("beta, kl_target and epsilons must be >= 0")
        if self.epochs < 1 or self.mini_batches < 1:
            raise ValueError("epochs and mini_batches must be >= 1")


@dataclass
class GroupRelativeConfig(PolicyGradientConfig):
    """Plus GRPO's group-relative advantages."""

    scale_std: bool = True  # divide by the group std (False = Dr. GRPO style)
    std_eps: float = 1e-4  # added to the std; TRL 1e-4, verl 1e-6


class PolicyGradient(KLControlled):
    """Group advantages shared by every token of a completion, the clipped surrogate (``surrogate``),
    optionally × the trainer's truncated importance weights, plus β·k3 to the reference in the loss
    (``kl_in_loss``), aggregated by ``loss_agg``. Variants override ``advantages`` (rloo),
    ``surrogate`` (gspo, cispo) or ``prepare`` (reinforce_pp). With μ = 1 and one mini-batch the old
    policy is the current one: ρ = 1 in value and its gradient is the policy gradient, so no
    old-logprob pass is needed."""

    Config = GroupRelativeConfig
    kl_in_loss = True  # variants that put the KL into the reward (reinforce_pp) turn the loss term off

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(reference=config.beta > 0 or config.kl_target > 0, group_size=2, epochs=config.epochs,
                     old_logprobs=config.epochs > 1 or config.mini_batches > 1, mini_batches=config.mini_batches)

    def advantages(self, rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] advantages and [B] uniform-group flags (GRPO's group-relative ones)."""
        return group_advantages(rewards, group_size, self.config.scale_std, self.config.std_eps)

    def prepare(self, rollouts: Rollouts, rewards: torch.Tensor, ctx: StepContext) -> TrainBatch:
        adv, zero = self.advantages(rewards, rollouts.group_size)  # [N], [B]
        batch = TrainBatch.from_rollouts(rollouts, advantages=adv)
        batch.metrics.update({"pg/zero_std_frac": zero.float().mean().item(),
                              "pg/zero_std_groups": float(zero.sum().item()),
                              "pg/adv_abs_mean": adv.abs().mean().item()})
        return batch

    def surrogate(self, logprobs: torch.Tensor, old: torch.Tensor, batch: TrainBatch, ctx: StepContext):
        """Per-token policy-gradient loss [n, C] and clipped mask [n, C]."""
        c = self.config
        return clipped_surrogate(logprobs, old, batch["advantages"], c.epsilon_low, c.epsilon_high)

    def loss(self, logprobs: torch.Tensor, batch: TrainBatch, ctx: StepContext):
        c = self.config
        mask = batch["completion_mask"]  # [n, C]
        old = ctx.old_logprobs if ctx.old_logprobs is not None else logprobs.detach()  # [n, C]
        pg, clipped = self.surrogate(logprobs, old, batch, ctx)
        if ctx.is_weights is not None:  # the trainer's truncated IS correction for sampler/trainer mismatch
            pg = pg * ctx.is_weights
        per_token = pg
        beta = self.kl_ctl.beta
        metrics = {}
        if self.kl_in_loss and ctx.ref_logprobs is not None and beta > 0:
            kl = k3_kl(logprobs, ctx.ref_logprobs)  # [n, C]
            per_token = pg + beta * kl
            metrics["pg/kl_term"] = aggregate(kl.detach(), mask, c.loss_agg, batch.totals, ctx.max_tokens).item()
        loss = aggregate(per_token, mask, c.loss_agg, batch.totals, ctx.max_tokens)
        metrics["clip_frac"] = ((clipped * mask).sum() / batch.totals["tokens"]).item()
        return loss, metrics
