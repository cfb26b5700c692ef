"""Algorithm ``gspo``: Group Sequence Policy Optimization (Zheng et al., 2025).

GRPO's group advantages, but the importance ratio and its clipping are per
sequence, the geometric mean of the token ratios:

    s_i = exp( (1/|o_i|) Σ_t [logπ_θ(o_it) − logπ_old(o_it)] )
    loss_i = −min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i)

averaged over sequences. Because s_i is length-normalised its clip range is
tiny (the paper: 3e-4 / 4e-4). A token-level ratio is noisy for long
completions; the sequence ratio matches the sequence-level reward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench.policy_gradient import GroupRelativeConfig, PolicyGradient


@rlbench.hookimpl
def rlbench_algorithms():
    return {"gspo": "rlbench.plugins.algorithms.gspo:GSPO"}


def sequence_surrogate(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                       eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence clipped loss [n] and clipped flags [n]."""
    log_s = ((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [n]
    s = torch.exp(log_s)  # [n]
    unclipped = s * adv
    clipped = torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


@dataclass
class GSPOConfig(GroupRelativeConfig):
    epsilon_low: float = 3e-4
    epsilon_high: float = 4e-4
    beta: float = 0.0


class GSPO(PolicyGradient):
    Config = GSPOConfig

    def surrogate(self, logprobs, old, batch, ctx):
        c = self.config
        mask = batch["completion_mask"]
        per_seq, clipped = sequence_surrogate(logprobs, old, batch["advantages"], mask, c.epsilon_low, c.epsilon_high)
        # Spread each sequence's loss over its tokens so seq_mean aggregation gives mean_i loss_i.
        return per_seq.unsqueeze(-1) * mask, clipped.unsqueeze(-1) * mask  # [n, C]
