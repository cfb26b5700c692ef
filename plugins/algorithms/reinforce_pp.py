"""Algorithm ``reinforce_pp``: REINFORCE++ (Hu, 2025).

No critic and no per-group baseline. The KL penalty is part of the reward,
per token (k1 = logπ_old − logπ_ref, with the sampler's logprobs as π_old when
μ = 1), the task reward is added at the last completion token, and the
advantage of token t is the return Σ_{s≥t} r_s (γ = 1). Advantages are then
normalised over every completion token of the batch (mean 0, std 1; the population
variance, as the paper's implementation in OpenRLHF: see ``rlbench.ops``). The loss
is the token-level clipped surrogate (token_mean), without a KL term in the loss.

"The batch" is the batch ``prepare`` sees: in a multi-process run that is one rank's
shard of the step's prompts, so the mean and std are per rank (as in verl, whose
whitening runs per data-parallel worker), not over the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench import ops
from rlbench.policy_gradient import PolicyGradient, PolicyGradientConfig
from rlbench.types import Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"reinforce_pp": "rlbench.plugins.algorithms.reinforce_pp:ReinforcePP"}


@dataclass
class ReinforcePPConfig(PolicyGradientConfig):
    beta: float = 0.01  # KL-in-reward coefficient
    loss_agg: str = "token_mean"


class ReinforcePP(PolicyGradient):
    Config = ReinforcePPConfig
    kl_in_loss = False  # the KL penalty is already in the token rewards

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(reference=config.beta > 0, group_size=1, epochs=config.epochs,
                     old_logprobs=config.epochs > 1 or config.mini_batches > 1, mini_batches=config.mini_batches)

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        mask = rollouts.completion_mask.float()  # [N, C]
        old = ctx.old_logprobs if ctx.old_logprobs is not None else rollouts.sampler_logprobs  # [N, C]
        kl = ops.k1_kl(old, ctx.ref_logprobs) if ctx.ref_logprobs is not None else torch.zeros_like(mask)  # [N, C]
        token_r = ops.kl_penalized_rewards(rewards, mask, kl, self.kl_ctl.beta, rollouts.turn_rewards)  # [N, C]
        adv = ops.whiten(ops.returns_to_go(token_r, mask), mask)  # [N, C]
        batch = TrainBatch.from_rollouts(rollouts, advantages=adv)
        batch.metrics["reinforce_pp/kl_reward"] = (-self.kl_ctl.beta * kl * mask).sum().item() / rollouts.n
        return batch
