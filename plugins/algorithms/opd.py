"""Algorithm ``opd``: on-policy distillation — the student samples, a frozen teacher grades every token.

The student (the policy) samples G completions per prompt through the shared sampler; the teacher
(``teacher``: any model the ``model`` section accepts — a hub id, an alias, or a checkpoint written
by ``rlbench export`` — with the student's tokenizer) scores the same tokens in a no-grad pass
(``Needs.teacher``; its forward FLOPs are counted, 2 · teacher parameters per token). The
per-token reverse KL, estimated on the student's own samples,

    d_t  = log π_θ(o_t) − log π_teacher(o_t)          (both at the sampling temperature T)
    loss = agg( sg(d_t) · exp(log π_θ(o_t) − sg(log π_θ(o_t))) ) − reward_coef · agg( A · exp(…) )

has the value of the reverse-KL estimate KL(π_θ ‖ π_teacher) and the gradient Σ d_t ∇log π_θ(o_t):
the policy gradient with the per-token reward −d_t and no credit to later tokens (the teacher grades
each token where it stands, as Agarwal et al.'s GKD and Thinking Machines' on-policy distillation
do). With ``reward_coef`` > 0 the task's verifiable reward joins it as GRPO's group-relative
advantage A. When the teacher is the student, d = 0: the loss and its gradient are 0.

Not covered: forward KL or generalised JSD (GKD's other divergences), a teacher with another
tokenizer, a teacher sharded across processes (it is loaded whole on every process).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench import ops
from rlbench.types import AlgorithmBase, Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"opd": "rlbench.plugins.algorithms.opd:OPD"}


@dataclass
class OPDConfig:
    teacher: str = ""  # the teacher model: an alias, a hub id or a local checkpoint (rlbench export)
    reward_coef: float = 0.0  # > 0: add the task reward's group-relative advantage (GRPO's) with this weight
    loss_agg: str = "token_mean"  # token_mean | seq_mean (rlbench.ops.aggregate)

    def validate(self):
        if not self.teacher:
            raise ValueError("teacher is required: the model to distil from (an alias, hub id or local checkpoint)")
        if self.reward_coef < 0:
            raise ValueError("reward_coef must be >= 0")
        if self.loss_agg not in ("token_mean", "seq_mean"):
            raise ValueError(f"loss_agg must be token_mean or seq_mean; got {self.loss_agg!r}")


def reverse_kl_surrogate(logp: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token surrogate [n, C] (value d_t, gradient d_t ∇log π) and d_t [n, C] itself."""
    d = (logp - teacher).detach()  # [n, C] the reverse-KL estimate per token
    return d * torch.exp(logp - logp.detach()), d


class OPD(AlgorithmBase):
    Config = OPDConfig

    def __init__(self, config: OPDConfig):
        self.config = config

    @classmethod
    def needs(cls, config: OPDConfig) -> Needs:
        return Needs(teacher=config.teacher, group_size=2 if config.reward_coef > 0 else 1)

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        if self.config.reward_coef <= 0:  # pure distillation: the reward takes no part in the loss
            return TrainBatch.from_rollouts(rollouts)
        adv, _ = ops.group_advantages(rewards, rollouts.group_size)  # [N]
        return TrainBatch.from_rollouts(rollouts, advantages=adv)

    def loss(self, logprobs, batch, ctx):
        mask = batch["completion_mask"]  # [n, C]
        surrogate, d = reverse_kl_surrogate(logprobs, ctx.teacher_logprobs)  # [n, C] each
        agg = self.config.loss_agg
        loss = ops.aggregate(surrogate, mask, agg, batch.totals)
        metrics = {"opd/reverse_kl": ops.aggregate(d, mask, agg, batch.totals).item()}
        if self.config.reward_coef > 0:
            ratio = torch.exp(logprobs - logprobs.detach())  # [n, C] value 1, gradient ∇log π
            pg = ops.aggregate(-batch["advantages"].unsqueeze(-1) * ratio, mask, agg, batch.totals)
            loss = loss + self.config.reward_coef * pg
            metrics["opd/pg_loss"] = pg.item()
        return loss, metrics
