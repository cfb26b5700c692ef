"""Algorithm ``grpo``: Group Relative Policy Optimization (DeepSeekMath / R1).

For each prompt, G completions are sampled and scored. Advantages are
group-relative, A_i = (r_i − mean_g) / (std_g + eps), shared by every token of
completion i. The loss per token is the PPO clipped surrogate plus β times the
k3 estimate of KL(π_θ || π_ref):

    ρ_t   = exp(logπ_θ(o_t) − logπ_old(o_t))
    pg_t  = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A)
    kl_t  = exp(logπ_ref − logπ_θ) − (logπ_ref − logπ_θ) − 1       (k3, ≥ 0)
    loss  = agg(pg_t + β kl_t)

Aggregation (``loss_agg``): ``seq_mean`` averages tokens within each completion,
then completions (DeepSeekMath); ``token_mean`` averages over every completion
token of the optimizer batch (DAPO), so long completions weigh more.

Choices that frameworks make differently, all config values here:
  std_eps 1e-4 (TRL's; verl uses 1e-6) · scale_std (Dr. GRPO drops it) ·
  β 0.04 (DeepSeekMath) · ε 0.2 · adaptive β off unless ``kl_target`` is set.
A group whose rewards are all equal (std = 0) has zero advantage: it adds only
the KL term, and is counted in ``grpo/zero_std_frac``.

With μ = 1 (``epochs``) and one mini-batch the old policy is the current one:
ρ = 1 in value but its gradient is the policy gradient, so no old-logprob pass
is needed. With μ > 1 or ``mini_batches`` > 1 (several optimizer steps per
rollout batch) the trainer stores old logprobs from a no-grad pass first.

Left out: dynamic sampling of zero-variance groups and overlong shaping (``dapo``),
sequence-level ratios (``gspo``) — each its own plugin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import rlbench
from rlbench.types import Needs, Rollouts, StepContext, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"grpo": "rlbench.plugins.algorithms.grpo:GRPO"}


LOSS_AGGS = ("seq_mean", "token_mean", "constant_length")


@dataclass
class PolicyGradientConfig:
    """Options shared by the clipped-surrogate family (grpo, dr_grpo, rloo, gspo, …)."""

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
class GRPOConfig(PolicyGradientConfig):
    scale_std: bool = True  # divide by the group std (False = Dr. GRPO style)
    std_eps: float = 1e-4  # added to the std; TRL 1e-4, verl 1e-6


# -- pure functions ---------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(r − mean_g) / (std_g + eps) per group of ``group_size`` consecutive rows.

    Returns advantages [N] and a bool [N / G] marking groups whose std is 0."""
    r = rewards.view(-1, group_size).float()  # [B, G]
    mean = r.mean(-1, keepdim=True)  # [B, 1]
    std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # [B, 1] (unbiased, as TRL)
    zero = (r.max(-1).values - r.min(-1).values) == 0  # [B]
    adv = r - mean  # [B, G]
    if scale_std:
        adv = adv / (std + eps)
    adv = torch.where(zero.unsqueeze(-1), torch.zeros_like(adv), adv)  # exact 0 for std = 0 groups
    return adv.reshape(-1), zero


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π || π_ref) per token: e^{d} − d − 1, d = ref − logp. ≥ 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ)A) [N, C] and a float mask of clipped tokens [N, C]."""
    ratio = torch.exp(logp - old_logp)  # [N, C]
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [N, 1] or [N, C]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    loss = -torch.minimum(unclipped, clipped)  # [N, C]
    was_clipped = (clipped < unclipped).float()  # the clipped branch was taken
    return loss, was_clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, totals: dict) -> torch.Tensor:
    """This micro-batch's share of the batch loss; summing shares over micro-batches
    gives the loss of the whole optimizer batch exactly."""
    if mode == "token_mean":
        return (per_token * mask).sum() / totals["tokens"]
    if mode == "constant_length":  # Dr. GRPO: every completion divided by the same budget
        return (per_token * mask).sum() / (totals["seqs"] * totals["max_tokens"])
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    return per_seq.sum() / totals["seqs"]


class AdaptiveKL:
    """β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) / horizon), once per step."""

    def __init__(self, beta: float, target: float, horizon: float):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float) -> float:
        if self.target > 0 and math.isfinite(kl):
            err = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + err / self.horizon
        return self.beta


# -- the plugin -------------------------------------------------------------

class GRPO:
    Config = GRPOConfig
    kl_in_loss = True  # variants that put the KL into the reward (reinforce_pp) turn the loss term off

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.kl_ctl = AdaptiveKL(config.beta, config.kl_target, config.kl_horizon)

    @classmethod
    def needs(cls, config: GRPOConfig) -> Needs:
        return Needs(reference=config.beta > 0 or config.kl_target > 0, group_size=2, epochs=config.epochs,
                     old_logprobs=config.epochs > 1 or config.mini_batches > 1, mini_batches=config.mini_batches)

    def advantages(self, rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[N] advantages and [B] zero-variance flags; the family's variants override this."""
        return group_advantages(rewards, group_size, self.config.scale_std, self.config.std_eps)

    def prepare(self, rollouts: Rollouts, rewards: torch.Tensor, ctx: StepContext) -> TrainBatch:
        adv, zero = self.advantages(rewards, rollouts.group_size)  # [N], [B]
        batch = TrainBatch.from_rollouts(rollouts, advantages=adv)
        batch.metrics.update({"grpo/zero_std_frac": zero.float().mean().item(),
                              "grpo/zero_std_groups": float(zero.sum().item()),
                              "grpo/adv_abs_mean": adv.abs().mean().item()})
        return batch

    def surrogate(self, logprobs: torch.Tensor, old: torch.Tensor, batch: TrainBatch):
        """Per-token policy-gradient loss [n, C] and clipped mask [n, C]; GSPO overrides this."""
        c = self.config
        return clipped_surrogate(logprobs, old, batch["advantages"], c.epsilon_low, c.epsilon_high)

    def loss(self, logprobs: torch.Tensor, batch: TrainBatch, ctx: StepContext):
        c = self.config
        mask = batch["completion_mask"]  # [n, C]
        old = batch["old_logprobs"] if "old_logprobs" in batch else logprobs.detach()  # [n, C]
        pg, clipped = self.surrogate(logprobs, old, batch)
        if "is_weights" in batch:  # trainer's truncated IS correction for sampler/trainer mismatch
            pg = pg * batch["is_weights"]
        per_token = pg
        beta = self.kl_ctl.beta
        metrics = {}
        if self.kl_in_loss and "ref_logprobs" in batch and beta > 0:
            kl = k3_kl(logprobs, batch["ref_logprobs"])  # [n, C]
            per_token = pg + beta * kl
            metrics["grpo/kl_term"] = aggregate(kl.detach(), mask, c.loss_agg, batch.totals).item()
        loss = aggregate(per_token, mask, c.loss_agg, batch.totals)
        metrics["clip_frac"] = ((clipped * mask).sum() / batch.totals["tokens"]).item()
        return loss, metrics

    def after_step(self, metrics: dict) -> dict:
        """Called once per optimizer step with the step's metrics (``kl`` included)."""
        beta = self.kl_ctl.update(metrics.get("kl", float("nan")))
        return {"grpo/beta": beta}

    def state_dict(self) -> dict:
        return {"beta": self.kl_ctl.beta}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.beta = state["beta"]
