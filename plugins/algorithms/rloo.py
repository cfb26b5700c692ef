"""Algorithm ``rloo``: REINFORCE Leave-One-Out (Ahmadian et al., 2024).

The baseline of completion i is the mean reward of the *other* G − 1
completions of its prompt: A_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_g).
No std scaling. The loss is the family's clipped surrogate (with μ = 1 the
ratio is 1, so it is plain REINFORCE with this baseline) plus optional k3 KL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench.plugins.algorithms.grpo import GRPO, PolicyGradientConfig


@rlbench.hookimpl
def rlbench_algorithms():
    return {"rloo": "rlbench.plugins.algorithms.rloo:RLOO"}


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = rewards.view(-1, group_size).float()  # [B, G]
    others = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # [B, G] mean of the other samples
    zero = (r.max(-1).values - r.min(-1).values) == 0  # [B]
    return (r - others).reshape(-1), zero


@dataclass
class RLOOConfig(PolicyGradientConfig):
    beta: float = 0.0


class RLOO(GRPO):
    Config = RLOOConfig

    def advantages(self, rewards, group_size):
        return leave_one_out_advantages(rewards, group_size)
