"""Algorithm ``rloo``: REINFORCE Leave-One-Out (Ahmadian et al., 2024).

The baseline of completion i is the mean reward of the *other* G − 1
completions of its prompt: A_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_g).
No std scaling. The loss is the family's clipped surrogate plus optional k3 KL,
aggregated by ``loss_agg`` like every member of the family.

What that means at the defaults (μ = 1, ``loss_agg: seq_mean``): the ratio is 1 in value, and
each completion's token losses are averaged over its length, so completion i contributes
−A_i · (1/|o_i|) Σ_t ∇logπ(o_it): a length-normalised REINFORCE with this baseline. The paper's
REINFORCE (and TRL's RLOOTrainer, whose ratio and loss are per sequence) use the sequence
log-likelihood Σ_t logπ(o_it) without the 1/|o_i|; ``loss_agg: constant_length`` gives that
sum, divided by the constant ``rollout.max_tokens``. The default is kept at seq_mean on purpose:
rloo then differs from grpo in exactly one thing, the baseline, which is the comparison a
benchmark of advantage estimators wants.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench.ops import uniform_groups
from rlbench.policy_gradient import PolicyGradient, PolicyGradientConfig


@rlbench.hookimpl
def rlbench_algorithms():
    return {"rloo": "rlbench.plugins.algorithms.rloo:RLOO"}


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = rewards.view(-1, group_size).float()  # [B, G]
    others = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # [B, G] mean of the other samples
    return (r - others).reshape(-1), uniform_groups(r, group_size)


@dataclass
class RLOOConfig(PolicyGradientConfig):
    beta: float = 0.0


class RLOO(PolicyGradient):
    Config = RLOOConfig

    def advantages(self, rewards, group_size):
        return leave_one_out_advantages(rewards, group_size)
