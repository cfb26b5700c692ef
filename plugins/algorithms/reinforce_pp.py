"""Algorithm ``reinforce_pp``: REINFORCE++ (Hu, 2025).

No critic and no per-group baseline. The KL penalty is part of the reward,
per token (k1 = logπ_old − logπ_ref, with the sampler's logprobs as π_old when
μ = 1), the task reward is added at the last completion token, and the
advantage of token t is the return Σ_{s≥t} r_s (γ = 1). Advantages are then
normalised over every completion token of the batch (mean 0, std 1). The loss
is the token-level clipped surrogate (token_mean), without a KL term in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench.plugins.algorithms.grpo import GRPO, PolicyGradientConfig
from rlbench.types import Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"reinforce_pp": "rlbench.plugins.algorithms.reinforce_pp:ReinforcePP"}


def token_returns(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """Returns-to-go [N, C] of r_t = −β·kl_t, plus the sequence reward at its last real token."""
    r = -beta * kl * mask  # [N, C]
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # [N]
    r = r.scatter_add(1, last.unsqueeze(-1), rewards.float().unsqueeze(-1))
    return torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) * mask  # [N, C]


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) / torch.sqrt(var + eps) * mask


@dataclass
class ReinforcePPConfig(PolicyGradientConfig):
    beta: float = 0.01  # KL-in-reward coefficient
    loss_agg: str = "token_mean"


class ReinforcePP(GRPO):
    Config = ReinforcePPConfig
    kl_in_loss = False  # the KL penalty is already in the token rewards

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(reference=config.beta > 0, group_size=1, epochs=config.epochs,
                     old_logprobs=config.epochs > 1 or config.mini_batches > 1, mini_batches=config.mini_batches)

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        mask = rollouts.completion_mask.float()  # [N, C]
        old = ctx.old_logprobs if ctx.old_logprobs is not None else rollouts.logprobs  # [N, C]
        kl = (old - ctx.ref_logprobs) if ctx.ref_logprobs is not None else torch.zeros_like(mask)  # k1 [N, C]
        adv = whiten(token_returns(rewards, mask, kl, self.kl_ctl.beta), mask)  # [N, C]
        batch = TrainBatch.from_rollouts(rollouts, advantages=adv)
        batch.metrics["reinforce_pp/kl_reward"] = (-self.kl_ctl.beta * kl * mask).sum().item() / rollouts.n
        return batch
