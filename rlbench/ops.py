"""The maths that algorithms and the trainer share: pure functions over tensors (verl's core_algos
is the model). State lives elsewhere: the adaptive KL controller and the clipped-surrogate family
built from these functions are in ``rlbench.policy_gradient``.

Plugins import this module, ``rlbench.policy_gradient`` and ``rlbench.types``, never each other. Shapes: N rows (completions),
B prompt groups of G consecutive rows (group-major), C completion positions; ``mask`` [N, C] is
1.0 on real completion tokens and 0.0 on padding.

Conventions that frameworks choose differently, decided here with their sources:
  * group std: unbiased (n − 1), as TRL's GRPOTrainer (``torch.std``); ``eps`` is added to the std
    (TRL 1e-4, verl 1e-6; a config value of each algorithm).
  * whitening (PPO, REINFORCE++): population variance, dividing by the number of real tokens n, as
    REINFORCE++'s reference implementation (OpenRLHF's experience maker) and OpenAI baselines' PPO2
    (numpy's ``std``, ddof 0); verl's ``masked_whiten`` and TRL divide by n − 1. Over n tokens the
    two scales differ by √(n / (n − 1)): under 0.5% once a batch holds 100 tokens.
  * KL estimators (Schulman, "Approximating KL Divergence", 2020), with d = logπ_ref − logπ:
    k1 = −d, unbiased, signed: the per-token KL penalty inside the reward of PPO and REINFORCE++
    (with π_old); k3 = e^d − d − 1 ≥ 0, low variance: GRPO's loss term and the trainer's ``kl``.
  * "all rewards of a group are equal" is decided once, by ``uniform_groups`` (max − min == 0):
    such a group carries no advantage (GRPO, RLOO), no preference pair (DPO) and is dropped by
    dynamic sampling (DAPO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


LOSS_AGGS = ("seq_mean", "token_mean", "constant_length")


# -- group statistics ----------------------------------------------------------------------

def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [B]: the group's G rewards are all equal (its std is exactly 0)."""
    r = rewards.view(-1, group_size)  # [B, G]
    return (r.max(-1).values - r.min(-1).values) == 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(r − mean_g) / (std_g + eps) per group of ``group_size`` consecutive rows (``scale_std``
    False: r − mean_g). Returns advantages [N] and ``uniform_groups`` [B]; a uniform group's
    advantages are exactly 0."""
    r = rewards.view(-1, group_size).float()  # [B, G]
    mean = r.mean(-1, keepdim=True)  # [B, 1]
    std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # [B, 1] unbiased
    zero = uniform_groups(r, group_size)  # [B]
    adv = r - mean  # [B, G]
    if scale_std:
        adv = adv / (std + eps)
    adv = torch.where(zero.unsqueeze(-1), torch.zeros_like(adv), adv)
    return adv.reshape(-1), zero


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the real tokens of the batch (population variance, see
    the module docstring); 0 at padding."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) / torch.sqrt(var + eps) * mask


# -- KL estimators ---------------------------------------------------------------------------

def k1_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """logπ − logπ_ref per token: unbiased, can be negative."""
    return logp - ref_logp


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """e^d − d − 1 per token, d = logπ_ref − logπ: ≥ 0, and 0 only where the two are equal."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# -- per-token rewards and returns -------------------------------------------------------------

def last_index(mask: torch.Tensor) -> torch.Tensor:
    """[N] the position of each row's last real token (0 for an empty row); the mask may have gaps
    (a multi-turn trajectory's environment tokens are 0 between sampled turns)."""
    C = mask.shape[1]
    return (C - 1 - torch.flip(mask > 0, [1]).float().argmax(-1)).clamp(min=0) * (mask > 0).any(-1)


def kl_penalized_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor, beta: float,
                         turn_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards [N, C]: −β·kl on every real token, plus the sequence reward [N] on the
    last real token (the KL-in-reward construction of PPO for RLHF and REINFORCE++); 0 at padding.
    ``turn_rewards`` [N, C] (a multi-turn environment's, at each turn's last sampled token) are
    added where they are, and only the rest of the sequence reward (reward − their sum) goes on
    the last token, so a trajectory's tokens still sum to its reward."""
    r = -beta * kl * mask  # [N, C]
    last = last_index(mask)  # [N]
    final = rewards.float()
    if turn_rewards is not None:
        r = r + turn_rewards.float() * mask
        final = final - (turn_rewards.float() * mask).sum(-1)
    r = r.scatter_add(1, last.unsqueeze(-1), final.unsqueeze(-1))
    return r * mask


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{s ≥ t} r_s per token [N, C] (γ = 1); 0 at padding."""
    return torch.flip(torch.cumsum(torch.flip(token_rewards, [1]), 1), [1]) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded tokens: advantages and returns [N, C].
    δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}, R_t = A_t + V_t; V after the last token is 0."""
    N, C = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(N)
    next_v = torch.zeros(N)
    for t in reversed(range(C)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_adv = torch.where(m > 0, a, next_adv)  # padding passes the future through untouched
        next_v = torch.where(m > 0, values[:, t], next_v)
    return adv, (adv + values) * mask


# -- surrogate and aggregation --------------------------------------------------------------------

def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A), ρ = π_θ/π_old [N, C], and a float mask
    of the tokens where the clipped branch was taken [N, C]. ``adv`` is [N] (per sequence) or [N, C]."""
    ratio = torch.exp(logp - old_logp)  # [N, C]
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [N, 1] or [N, C]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


IS_CORRECTIONS = ("none", "truncate", "mask", "decoupled")


def behavior_weights(logp: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, mode: str, cap: float,
                     low: float = 0.0, level: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Off-policy weights on the policy-gradient term (no gradient) [n, C] and a float mask of the
    tokens they zeroed [n, C]; ρ = exp(logp − behavior) per token, behavior = the logprobs of the
    policy that generated the tokens:

      * ``truncate``: min(ρ, cap) (truncated IS; Yao et al., "Your efficient RL framework secretly
        brings you off-policy RL training", 2025; verl's rollout TIS);
      * ``mask``: ρ where low ≤ ρ ≤ cap, else 0 (masked IS, verl's rollout_is_mode mask);
        ``level`` sequence: the sequence's ρ_seq = exp(Σ_t log ρ_t) decides and weighs every
        token of it;
      * ``decoupled``: ``logp`` is the proximal policy's (the weights before this step) and the
        weight is the behaviour→proximal ratio, 0 where it exceeds cap (AReaL, Fu et al. 2025,
        arXiv 2505.24298, its ``behav_imp_weight_cap``); the surrogate clips π_θ/π_proximal.
    Zeroed tokens still count in the loss normalisers (whole-batch totals, fixed in ``prepare``)."""
    log_ratio = (logp.detach() - behavior) * mask  # [n, C]
    if mode == "truncate":
        return torch.exp(log_ratio).clamp(max=cap) * mask, torch.zeros_like(mask)
    if mode == "mask" and level == "sequence":
        ratio = torch.exp(log_ratio.sum(-1, keepdim=True)).expand_as(mask)  # [n, C]
    else:
        ratio = torch.exp(log_ratio)  # [n, C]
    keep = ratio <= cap
    if mode == "mask":
        keep = keep & (ratio >= low)
    elif mode != "decoupled":
        raise ValueError(f"behavior_weights: mode must be one of {', '.join(IS_CORRECTIONS[1:])}; got {mode!r}")
    keep = keep.float() * mask
    return ratio * keep, mask - keep


@dataclass(frozen=True)
class Correction:
    """``rollout.is_correction`` and its bounds, for ``behavior_weights``."""

    mode: str
    cap: float
    low: float = 0.0  # 0: 1 / cap
    level: str = "token"

    def weights(self, logp: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor):
        return behavior_weights(logp, behavior, mask, self.mode, self.cap, self.low or 1.0 / self.cap, self.level)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, totals: dict, max_tokens: int = 0) -> torch.Tensor:
    """This micro-batch's share of the batch loss: summing the shares of all micro-batches gives
    the loss of the whole optimizer batch exactly (the normalisers in ``totals`` are whole-batch).

    ``seq_mean``: each completion's token mean, averaged over completions (DeepSeekMath), so a
    completion's tokens weigh 1/length each; ``token_mean``: every token of the batch weighs the
    same (DAPO); ``constant_length``: token sums divided by completions × ``max_tokens`` (Dr. GRPO)."""
    if mode == "token_mean":
        return (per_token * mask).sum() / totals["tokens"]
    if mode == "constant_length":
        if max_tokens <= 0:
            raise ValueError("aggregate: constant_length needs max_tokens > 0 (the completion budget)")
        return (per_token * mask).sum() / (totals["seqs"] * max_tokens)
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [n]
    return per_seq.sum() / totals["seqs"]
