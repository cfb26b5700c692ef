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
the KL term, and is counted in ``pg/zero_std_frac``.

With μ = 1 (``epochs``) and one mini-batch the old policy is the current one:
ρ = 1 in value but its gradient is the policy gradient, so no old-logprob pass
is needed. With μ > 1 or ``mini_batches`` > 1 (several optimizer steps per
rollout batch) the trainer stores old logprobs from a no-grad pass first.

The maths is in ``rlbench.ops`` (``group_advantages``, ``clipped_surrogate``, ``k3_kl``,
``aggregate``, ``AdaptiveKL``), shared with the family's other members through
``rlbench.policy_gradient.PolicyGradient``; this file is GRPO's choice of them.

Left out: dynamic sampling of zero-variance groups and overlong shaping (``dapo``),
sequence-level ratios (``gspo``) — each its own plugin.
"""
from __future__ import annotations

from dataclasses import dataclass

import rlbench
from rlbench.policy_gradient import GroupRelativeConfig, PolicyGradient


@rlbench.hookimpl
def rlbench_algorithms():
    return {"grpo": "rlbench.plugins.algorithms.grpo:GRPO"}


@dataclass
class GRPOConfig(GroupRelativeConfig):
    """GRPO's defaults: β 0.04 (DeepSeekMath), ε 0.2, seq_mean, std-scaled group advantages."""


class GRPO(PolicyGradient):
    Config = GRPOConfig
