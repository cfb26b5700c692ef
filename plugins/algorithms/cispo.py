"""Algorithm ``cispo``: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585).

GRPO's group advantages, but instead of clipping the update of a token (PPO's min/clip, which
drops the gradient of a clipped token entirely) CISPO clips the importance weight and keeps
every token's REINFORCE gradient:

    r_t = π_θ(o_t) / π_behav(o_t),   r̂_t = clip(r_t, 1 − ε_low, 1 + ε_high)
    loss = −Σ_i Σ_t sg(r̂_t) · A_i · log π_θ(o_t)  /  Σ_i |o_i|       (token_mean)

π_behav is the policy that generated the tokens: the engine's logprobs of the sampled tokens
(``ctx.sampler_logprobs``), so with asynchronous rollouts (``rollout.off_policy_steps``) the
weight corrects for the lag; without them r_t is 1 up to the engine/trainer mismatch on the
first epoch and moves with further epochs. The paper sets no lower bound ("ε_low large"):
ε_low = 1 here, so r̂ ≥ 0; ε_high = 0.28 as DAPO's clip-higher (the paper tunes it and does not
print its value). No KL term (β = 0) as in the paper; a β > 0 adds GRPO's k3 term.

Left out: the paper's other M1 recipe parts (its length schedule, the FP32 LM head for its
hybrid-attention model), which are not parts of the objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench.policy_gradient import GroupRelativeConfig, PolicyGradient


@rlbench.hookimpl
def rlbench_algorithms():
    return {"cispo": "rlbench.plugins.algorithms.cispo:CISPO"}


def cispo_surrogate(logp: torch.Tensor, behavior: torch.Tensor, adv: torch.Tensor, eps_low: float,
                    eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −sg(clip(r, 1 − ε_low, 1 + ε_high))·A·logπ_θ [n, C] and a float mask of the tokens
    whose weight was clipped [n, C]; ``adv`` is [n] or [n, C]."""
    ratio = torch.exp(logp.detach() - behavior)  # [n, C]
    weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # [n, C], no gradient
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [n, 1] or [n, C]
    return -weight * a * logp, (weight != ratio).float()


@dataclass
class CISPOConfig(GroupRelativeConfig):
    beta: float = 0.0
    epsilon_low: float = 1.0  # no lower bound on the weight (the paper)
    epsilon_high: float = 0.28
    loss_agg: str = "token_mean"  # the paper normalises by the batch's tokens


class CISPO(PolicyGradient):
    Config = CISPOConfig

    def surrogate(self, logprobs, old, batch, ctx):
        c = self.config
        behavior = ctx.sampler_logprobs if ctx.sampler_logprobs is not None else old  # [n, C]
        return cispo_surrogate(logprobs, behavior, batch["advantages"], c.epsilon_low, c.epsilon_high)
