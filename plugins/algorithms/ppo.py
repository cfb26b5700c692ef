"""Algorithm ``ppo``: PPO with a learned critic and GAE (Schulman et al. 2017; the RLHF recipe of Ouyang et al. 2022).

Per-token rewards: r_t = −β·k1_t (k1 = logπ_old − logπ_ref, the KL penalty
inside the reward) plus the task reward on the last completion token. With the
critic's values V_t (from a no-grad pass before the update; V after the last
token is 0):

    δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    R_t = A_t + V_t

Advantages are whitened over the batch's completion tokens (``ops.whiten``: population
variance; per rank in a multi-process run, since ``prepare`` sees one rank's shard). Loss (token mean):
the clipped surrogate on A_t plus ``vf_coef`` × ½·max((V − R)², (V_clip − R)²),
with V_clip = V_old + clip(V − V_old, ±``value_clip``). β is fixed or adaptive
toward ``kl_target``. Each of ``epochs`` passes shuffles the batch and splits it
into ``mini_batches`` parts, one optimizer step each (old logprobs and old values
are stored before the first; the trainer does the shuffling). The critic
(``rlbench.modeling.critic.ValueModel``) is a copy of the policy's body with a scalar
head, or the body of ``critic_model`` (a smaller model with the same
tokenizer), trained by the same optimizer at ``critic_lr``.

Not covered: early stopping of the epochs on a KL threshold; a critic whose
tokenizer differs from the policy's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench import ops
from rlbench.policy_gradient import KLControlled
from rlbench.types import Needs, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"ppo": "rlbench.plugins.algorithms.ppo:PPO"}


@dataclass
class PPOConfig:
    beta: float = 0.05  # KL-in-reward coefficient (initial value when adaptive)
    kl_target: float = 0.0  # > 0: adaptive β
    kl_horizon: float = 10.0
    gamma: float = 1.0  # discount over tokens (1: the reward is for the whole completion)
    lam: float = 0.95  # GAE λ
    epsilon: float = 0.2  # policy clip
    value_clip: float = 0.2  # value clip around the old values
    vf_coef: float = 0.5
    critic_lr: float = 0.0  # 0 = train.lr
    critic_model: str = ""  # "" = initialised from the policy; else a model (same tokenizer), e.g. a smaller one
    epochs: int = 2  # passes over each rollout batch
    mini_batches: int = 2  # optimizer steps per pass: a fresh shuffle split into this many parts
    whiten_advantages: bool = True

    def validate(self):
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.epochs < 1 or self.mini_batches < 1 or self.beta < 0:
            raise ValueError("epochs and mini_batches must be >= 1 and beta >= 0")


def clipped_value_loss(v: torch.Tensor, v_old: torch.Tensor, returns: torch.Tensor, clip: float):
    """½·max((V − R)², (V_old + clip(V − V_old) − R)²) per token, and whether the clipped term won."""
    v_clip = v_old + torch.clamp(v - v_old, -clip, clip)
    a, b = (v - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(a, b), (b > a).float()


class PPO(KLControlled):
    """The KL coefficient (``beta``, adaptive toward ``kl_target``) is the family's controller."""

    Config = PPOConfig

    @classmethod
    def needs(cls, config: PPOConfig) -> Needs:
        return Needs(reference=config.beta > 0 or config.kl_target > 0, group_size=1, epochs=config.epochs,
                     old_logprobs=config.epochs > 1 or config.mini_batches > 1, mini_batches=config.mini_batches,
                     critic=True, critic_lr=config.critic_lr, critic_model=config.critic_model)

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        c = self.config
        mask = rollouts.completion_mask.float()  # [N, C]
        old = ctx.old_logprobs if ctx.old_logprobs is not None else rollouts.sampler_logprobs  # [N, C]
        kl = ops.k1_kl(old, ctx.ref_logprobs) if ctx.ref_logprobs is not None else torch.zeros_like(mask)  # [N, C]
        token_r = ops.kl_penalized_rewards(rewards, mask, kl, self.kl_ctl.beta, rollouts.turn_rewards)  # [N, C]
        values = ctx.values * mask  # [N, C] before the update
        adv, returns = ops.gae(token_r, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            adv = ops.whiten(adv, mask)
        batch = TrainBatch.from_rollouts(rollouts, advantages=adv, returns=returns, old_values=values)
        batch.metrics.update({"ppo/value_mean": (values.sum() / mask.sum()).item(),
                              "ppo/return_mean": (returns.sum() / mask.sum()).item()})
        return batch

    def loss(self, logprobs, batch, ctx):
        c = self.config
        mask = batch["completion_mask"]
        old = ctx.old_logprobs if ctx.old_logprobs is not None else logprobs.detach()
        pg, clipped = ops.clipped_surrogate(logprobs, old, batch["advantages"], c.epsilon, c.epsilon)
        if ctx.is_weights is not None:
            pg = pg * ctx.is_weights
        vloss, vclipped = clipped_value_loss(ctx.values, batch["old_values"], batch["returns"], c.value_clip)
        loss = ops.aggregate(pg + c.vf_coef * vloss, mask, "token_mean", batch.totals)
        n = batch.totals["tokens"]
        return loss, {"clip_frac": ((clipped * mask).sum() / n).item(),
                      "ppo/value_loss": ((vloss * mask).sum() / n).item(),
                      "ppo/value_clip_frac": ((vclipped * mask).sum() / n).item()}
