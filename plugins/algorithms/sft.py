"""Algorithm ``sft``: supervised fine-tuning on the task's reference solutions, the imitation baseline.

Each step draws the same seeded training prompts an online algorithm would; instead of sampling,
each prompt's one rollout is the task's reference written as a completion (``task.gold``: the
arithmetic generator's worked sum, gsm8k's worked solution, HumanEval's canonical program, a
dataset task's ``gold`` template), followed by the end-of-turn token (``Needs.gold_rollouts``;
rlbench/training/sampler.py). The loss is the negative log-likelihood of the solution tokens only —
the prompt is context, never a target — averaged over every solution token of the optimizer batch:

    loss = − Σ_{i,t} m_{i,t} log π_θ(o_{i,t} | x_i, o_{i,<t}) / Σ_{i,t} m_{i,t}

with π at T = 1 (the model's own distribution: nothing was sampled at a temperature). Costs are
counted as for every algorithm: no generated tokens (nothing is sampled), the forward and backward
passes over prompt + solution, the held-out evaluations. The references are scored by the task's
own verifier and logged as ``gold/accuracy`` (a reference the verifier rejects is still trained on:
the number says so); prompts without a reference are dropped (``gold/missing``).

Not covered: several examples packed into one sequence, a loss on the prompt, multi-turn
demonstrations, a separate file of demonstrations (a dataset task with a ``gold`` template is that).
"""
from __future__ import annotations

from dataclasses import dataclass

import rlbench
from rlbench import ops
from rlbench.types import AlgorithmBase, Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"sft": "rlbench.plugins.algorithms.sft:SFT"}


@dataclass
class SFTConfig:
    def validate(self):
        pass


class SFT(AlgorithmBase):
    Config = SFTConfig

    def __init__(self, config: SFTConfig):
        self.config = config

    @classmethod
    def needs(cls, config: SFTConfig) -> Needs:
        return Needs(gold_rollouts=True)

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        return TrainBatch.from_rollouts(rollouts)

    def loss(self, logprobs, batch, ctx):
        mask = batch["completion_mask"]  # [n, c] solution tokens
        nll = ops.aggregate(-logprobs, mask, "token_mean", batch.totals)
        return nll, {"sft/nll": nll.item()}
