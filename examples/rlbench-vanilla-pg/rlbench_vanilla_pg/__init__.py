"""Algorithm ``vanilla_pg``: REINFORCE with a batch-mean baseline, as a third-party plugin.

A = r − mean(r over the whole batch); loss = −mean over completions of
A · mean over tokens of log π(o_t). No clipping, no KL, no reference model.
"""
from dataclasses import dataclass

import torch

import rlbench
from rlbench.types import AlgorithmBase, Needs, TrainBatch

RLBENCH_API_VERSION = 2  # the hook API this plugin was written for


@rlbench.hookimpl
def rlbench_algorithms():
    return {"vanilla_pg": "rlbench_vanilla_pg:VanillaPG"}


@dataclass
class VanillaPGConfig:
    baseline: bool = True  # subtract the batch-mean reward


class VanillaPG(AlgorithmBase):
    Config = VanillaPGConfig

    def __init__(self, config):
        self.config = config

    @classmethod
    def needs(cls, config):
        return Needs(reference=False, group_size=1)

    def prepare(self, rollouts, rewards, ctx):
        adv = rewards - rewards.mean() if self.config.baseline else rewards  # [N]
        return TrainBatch.from_rollouts(rollouts, advantages=adv)

    def loss(self, logprobs, batch, ctx):
        mask = batch["completion_mask"]  # [n, C]
        seq_logp = (logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [n]
        loss = -(batch["advantages"] * seq_logp).sum() / batch.totals["seqs"]
        return loss, {}
