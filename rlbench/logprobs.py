"""Per-token log-probabilities of completions under a causal LM.

Convention (the same as vLLM's default ``logprobs``): *raw model* logprobs,
log_softmax of the unscaled logits, before temperature and top-p. The HF engine
reports its sampled tokens under the same convention, so sampler and trainer
logprobs compare like with like, and the importance ratio of the clipped
surrogate is π_θ/π_old of the model itself, not of the temperature-scaled sampler.

The LM head runs only on completion positions (``logits_to_keep``); prompt
positions never get full-vocabulary logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [N, L]


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int) -> torch.Tensor:
    """Logits predicting the last C tokens of each row."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=C + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]  # [N, C, V]


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each of the last C tokens of ``input_ids`` [N, L] → [N, C]."""
    logits = completion_logits(model, input_ids, attention_mask, C).float()  # [N, C, V]
    targets = input_ids[:, -C:]  # [N, C]
    logz = torch.logsumexp(logits, dim=-1)  # [N, C]
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz  # [N, C]
    ent = None
    if with_entropy:
        with torch.no_grad():
            p = F.softmax(logits.detach(), dim=-1)  # [N, C, V]
            ent = logz.detach() - (p * logits.detach()).sum(-1)  # [N, C]
    return lp, ent


def _length_chunks(attention_mask: torch.Tensor, C: int, batch_size: int):
    """Row chunks of similar length (longest first), each with the columns it needs:
    yields (rows, left, c) so that [:, left:P + c] holds every real token of those rows."""
    L = attention_mask.shape[1]
    P = L - C
    lengths = attention_mask.sum(-1)  # [N]
    order = torch.argsort(lengths, descending=True, stable=True)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        am = attention_mask[rows]
        real = am[:, :P].any(0).nonzero()
        left = int(real[0]) if len(real) else P
        c = max(1, int(am[:, P:].sum(-1).max().item()))
        yield rows, left, c


@torch.no_grad()
def batched_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int,
                     batch_size: int) -> torch.Tensor:
    """No-grad logprobs [N, C] in length-sorted chunks of ``batch_size`` rows, padding trimmed
    (reference / old-policy passes)."""
    P = input_ids.shape[1] - C
    out = torch.zeros(input_ids.shape[0], C, device=input_ids.device)
    for rows, left, c in _length_chunks(attention_mask, C, batch_size):
        lp, _ = token_logprobs(model, input_ids[rows, left:P + c], attention_mask[rows, left:P + c], c)
        out[rows, :c] = lp
    return out * attention_mask[:, P:]  # [N, C]


@torch.no_grad()
def exact_kl(policy, reference, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             completion_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Exact per-token KL(π || π_ref) = Σ_v π log(π/π_ref), summed over the vocabulary, [N, C]."""
    C = completion_mask.shape[1]
    P = input_ids.shape[1] - C
    out = torch.zeros(input_ids.shape[0], C, device=input_ids.device)
    for rows, left, c in _length_chunks(attention_mask, C, batch_size):
        ids, am = input_ids[rows, left:P + c], attention_mask[rows, left:P + c]
        lp = F.log_softmax(completion_logits(policy, ids, am, c).float(), -1)  # [b, c, V]
        lq = F.log_softmax(completion_logits(reference, ids, am, c).float(), -1)  # [b, c, V]
        out[rows, :c] = (lp.exp() * (lp - lq)).sum(-1)  # [b, c]
    return out * completion_mask  # [N, C]
