"""Algorithm ``dpo``: online (iterative) Direct Preference Optimization from the shared rollouts.

For each prompt group, the completion with the highest reward is *chosen* and
the one with the lowest is *rejected*; a group whose rewards are all equal has
no pair and is skipped (counted in ``dpo/skipped_groups``). With sequence
logprobs ℓ = Σ_t log π(o_t) and the frozen reference's ℓ_ref:

    h = β [(ℓ_c − ℓ_ref,c) − (ℓ_r − ℓ_ref,r)]
    sigmoid (Rafailov et al. 2023):  loss = −log σ(h)
    ipo     (Azar et al. 2023):      loss = (h/β − 1/(2β))²

averaged over pairs. ``dpo/reward_margin`` is the mean implicit reward margin
h and ``dpo/pair_accuracy`` the share of pairs with h > 0.

Rows are laid out [chosen_0, rejected_0, chosen_1, …] and ``Needs(pairs=True)``
tells the trainer to keep that order and never split a pair across micro-batches.
Not covered yet: offline DPO from a JSONL file of pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rlbench
from rlbench.types import AlgorithmBase, Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"dpo": "rlbench.plugins.algorithms.dpo:DPO"}


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL constraint
    loss_type: str = "sigmoid"  # sigmoid | ipo

    def validate(self):
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")


def preference_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Row indices [2P] (chosen, rejected, …) of the best and worst completion per group, and skipped groups."""
    r = rewards.view(-1, group_size)  # [B, G]
    best, worst = r.argmax(-1), r.argmin(-1)  # [B]
    keep = r.max(-1).values > r.min(-1).values  # [B]
    base = torch.arange(r.shape[0]) * group_size
    rows = torch.stack([base + best, base + worst], -1)[keep].reshape(-1)  # [2P]
    return rows, int((~keep).sum())


def dpo_loss(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, beta: float, loss_type: str):
    """Per-pair loss [P] and margin h [P] from per-token logprobs [2P, C] laid out chosen/rejected."""
    seq = (logp * mask).sum(-1) - (ref * mask).sum(-1)  # [2P] log-ratio to the reference
    h = beta * (seq[0::2] - seq[1::2])  # [P]
    if loss_type == "ipo":
        return (h / beta - 1 / (2 * beta)) ** 2, h
    return -F.logsigmoid(h), h


class DPO(AlgorithmBase):
    Config = DPOConfig

    def __init__(self, config: DPOConfig):
        self.config = config

    @classmethod
    def needs(cls, config: DPOConfig) -> Needs:
        return Needs(reference=True, group_size=2, pairs=True)

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        rows, skipped = preference_pairs(rewards, rollouts.group_size)
        full = TrainBatch.from_rollouts(rollouts)
        tensors = {k: v[rows] for k, v in full.tensors.items()}
        tensors["ref_logprobs"] = ctx.ref_logprobs[rows]
        mask = tensors["completion_mask"]
        batch = TrainBatch(tensors, {"seqs": float(len(rows)), "tokens": float(mask.sum().clamp(min=1)),
                                     "pairs": float(max(1, len(rows) // 2))})
        batch.metrics.update({"dpo/pairs": float(len(rows) // 2), "dpo/skipped_groups": float(skipped)})
        return batch

    def loss(self, logprobs, batch, ctx):
        per_pair, h = dpo_loss(logprobs, batch["ref_logprobs"], batch["completion_mask"], self.config.beta,
                               self.config.loss_type)
        n = batch.totals["pairs"]
        return per_pair.sum() / n, {"dpo/reward_margin": h.sum().item() / n,
                                    "dpo/pair_accuracy": (h > 0).float().sum().item() / n}
