"""Algorithm ``dapo``: Decoupled clip and Dynamic sAmpling Policy Optimization (Yu et al., 2025).

GRPO with the four changes of the DAPO paper:
  * clip-higher: ε_low 0.2, ε_high 0.28, so low-probability tokens can rise
    (keeps entropy from collapsing);
  * dynamic sampling: prompt groups whose rewards are all equal carry no
    advantage, so they are dropped and more prompts are sampled until the
    batch is full again. The trainer does the sampling (``Needs.dynamic_sampling``
    = the most extra rounds); ``sampling/kept_groups``, ``sampling/dropped_groups``
    and ``sampling/rounds`` say what it took. If the rounds run out the step
    trains on the informative groups it found;
  * token-level loss (``token_mean``): every token of the batch weighs the same,
    so long completions are not down-weighted per token;
  * soft overlong punishment, added to the task reward before the advantages:
    with L_max = ``rollout.max_tokens`` and L_cache = ``overlong_buffer_frac`` × L_max,

        0                                   if |o| ≤ L_max − L_cache
        ((L_max − L_cache) − |o|) / L_cache × ``overlong_penalty``   otherwise (down to −penalty at L_max)

and no KL term (β = 0), as in the paper. Groups are filtered on the task reward
(before the length penalty), as verl's recipe filters on accuracy.

Left out: the paper's overlong *filtering* (masking truncated samples), which
the soft punishment replaces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench.policy_gradient import GroupRelativeConfig, PolicyGradient
from rlbench.types import Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"dapo": "rlbench.plugins.algorithms.dapo:DAPO"}


@dataclass
class DAPOConfig(GroupRelativeConfig):
    beta: float = 0.0  # DAPO drops the KL term
    epsilon_high: float = 0.28  # clip-higher
    loss_agg: str = "token_mean"
    dynamic_sampling: int = 4  # most extra rounds of prompts to refill zero-variance groups (0 = off)
    overlong_buffer_frac: float = 0.2  # L_cache / L_max (paper: 4096 of 20480); 0 = no length penalty
    overlong_penalty: float = 1.0  # the penalty at L_max

    def validate(self):
        super().validate()
        if not 0 <= self.overlong_buffer_frac <= 1 or self.overlong_penalty < 0 or self.dynamic_sampling < 0:
            raise ValueError("overlong_buffer_frac must be in [0, 1], overlong_penalty and dynamic_sampling >= 0")


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: float, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment [N]: 0 up to L_max − buffer, then linear to −penalty at L_max."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_tokens - buffer
    return ((start - lengths.float()) / buffer).clamp(min=-1.0, max=0.0) * penalty  # [N]


class DAPO(PolicyGradient):
    Config = DAPOConfig

    @classmethod
    def needs(cls, config: DAPOConfig) -> Needs:
        n = super().needs(config)
        n.dynamic_sampling = config.dynamic_sampling
        return n

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        c = self.config
        pen = overlong_penalty(rollouts.lengths(), ctx.max_tokens, c.overlong_buffer_frac * ctx.max_tokens,
                               c.overlong_penalty)  # [N]
        batch = super().prepare(rollouts, rewards + pen, ctx)
        batch.metrics.update({"dapo/overlong_penalty_mean": pen.mean().item(),
                              "dapo/overlong_frac": (pen < 0).float().mean().item()})
        return batch
