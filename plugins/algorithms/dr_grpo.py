"""Algorithm ``dr_grpo``: GRPO "done right" (Liu et al., 2025, "Understanding R1-Zero-Like Training").

Two changes to GRPO, both removing a length/difficulty bias:
  * advantages are r − mean_g, not divided by the group std (hard or easy
    prompts, whose std is small, are not up-weighted);
  * every completion's token losses are summed and divided by the same
    constant (the generation budget ``rollout.max_tokens``), not by its own
    length, so a long wrong answer is not penalised less per token.
Everything else (clipped surrogate, k3 KL, μ) is GRPO's.
"""
from __future__ import annotations

from dataclasses import dataclass

import rlbench
from rlbench.policy_gradient import GroupRelativeConfig, PolicyGradient


@rlbench.hookimpl
def rlbench_algorithms():
    return {"dr_grpo": "rlbench.plugins.algorithms.dr_grpo:DrGRPO"}


@dataclass
class DrGRPOConfig(GroupRelativeConfig):
    scale_std: bool = False
    loss_agg: str = "constant_length"
    beta: float = 0.0  # the paper drops the KL term for rule-based rewards


class DrGRPO(PolicyGradient):
    Config = DrGRPOConfig
