"""Algorithm ``rft``: rejection-sampling fine-tuning (expert iteration; STaR, RAFT), the
online imitation baseline.

G completions per prompt come from the shared sampler, as for GRPO. The ones the verifier accepts
— total reward ≥ ``accept`` (1.0: the accuracy reward, since format adds at most 0.1) — are kept,
all of them or (``one_per_prompt``) the first accepted one of each group; the loss is their negative
log-likelihood, averaged over every kept token of the optimizer batch:

    loss = − Σ_{kept i,t} log π_T(o_{i,t}) / Σ_{kept i,t} 1

π_T is the sampling distribution (logits / rollout.temperature), as every online algorithm's
logprobs here (rlbench/modeling/logprobs.py): the trainer's logprobs stay comparable with the
sampler's, so the stale-weight check holds; at T = 1 it is the model's own likelihood. There is no
reference model, advantage or KL term. A step where no completion is accepted (anywhere) applies no
update — no optimizer or scheduler step — and counts ``update/empty``; ``rft/accepted_frac`` is the
share of completions kept. Rejected completions cost their generation and nothing more.

Not covered: filtering by anything but the summed reward (a reward above ``accept`` from format
alone cannot happen while format ≤ 0.1 < 1.0), deduplication of identical accepted completions,
several iterations over a fixed pool (STaR's outer loop: every step samples afresh here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench import ops
from rlbench.types import AlgorithmBase, Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"rft": "rlbench.plugins.algorithms.rft:RFT"}


@dataclass
class RFTConfig:
    accept: float = 1.0  # a completion is kept when its total reward reaches this (1.0: correct)
    one_per_prompt: bool = False  # keep only the first accepted completion of each group

    def validate(self):
        if self.accept <= 0:
            raise ValueError("accept must be > 0 (a completion with no reward is never a demonstration)")


def accepted_rows(rewards: torch.Tensor, group_size: int, accept: float, one_per_prompt: bool) -> torch.Tensor:
    """Indices [K] of the completions to imitate, in rollout order."""
    ok = rewards >= accept  # [N]
    if one_per_prompt:
        g = ok.view(-1, group_size)  # [B, G]
        first = torch.zeros_like(g)
        has = g.any(-1)  # [B]
        first[has.nonzero().view(-1), g.float().argmax(-1)[has]] = True  # argmax: the first True
        ok = first.view(-1)
    return ok.nonzero().view(-1)


class RFT(AlgorithmBase):
    Config = RFTConfig

    def __init__(self, config: RFTConfig):
        self.config = config

    @classmethod
    def needs(cls, config: RFTConfig) -> Needs:
        return Needs()

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        rows = accepted_rows(rewards, rollouts.group_size, self.config.accept, self.config.one_per_prompt)  # [K]
        full = TrainBatch.from_rollouts(rollouts)
        batch = full.select(rows)
        batch.metrics.update({"rft/accepted": float(len(rows)), "rft/accepted_frac": len(rows) / max(1, rollouts.n),
                              "rft/prompts_with_accepted": float(rollouts.group[rows].unique().numel())})
        return batch

    def loss(self, logprobs, batch, ctx):
        nll = ops.aggregate(-logprobs, batch["completion_mask"], "token_mean", batch.totals)
        return nll, {"rft/nll": nll.item()}
