"""Per-token log-probabilities of completions under a causal LM.

Convention: logprobs of the *sampling* distribution π_T ∝ exp(logits / T), T the rollouts'
temperature (``temperature``; 1 gives the model's own distribution). The samples come from π_T,
so the policy gradient of the expected reward is E[A ∇log π_T], and the clipped surrogate's ratio,
the off-policy corrections and the k3 KL are ratios of sampling distributions only when both sides
are π_T — as TRL (``_get_per_token_logps`` divides the logits by the temperature) and verl (the
actor divides the logits by ``temperature``) compute them. Both engines report the sampled
tokens' logprobs under the same π_T (hf: log_softmax(logits / T); vLLM: ``processed_logprobs``),
so the stale-weight check compares like with like at any temperature. top-p is not applied on
either side (the nucleus renormalisation is left out, as in TRL and verl; with top_p < 1 the
sampler's truncation is a mismatch the trainer does not model).

The LM head runs only on completion positions, and for the common architectures
(HEAD_SPLIT_MODEL_TYPES) only on the real ones: padding never gets full-vocabulary logits.

Shared prompts (``share_prompts``, on by default): the G completions of a group repeat one
prompt, which is most of the tokens on short-answer tasks (the quickstart: ~100 prompt tokens,
~15 completion tokens). Each distinct prompt of a batch is run once; its key/value cache is
indexed out to the rows that share it (differentiable, so the backward pass sums the rows'
gradients into the one prompt forward) and the completions run on top of it. The logits
predicting the first completion token come from the prompt's last position. Not used with
gradient checkpointing (transformers turns the cache off there) or when no prompt repeats.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [N, L]


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


def _can_share(model) -> bool:
    m = _unwrap(model)
    checkpointing = getattr(m, "is_activation_checkpointing", None)  # transformers >= 5.24
    if checkpointing is None:
        checkpointing = getattr(m, "is_gradient_checkpointing", False)
    return not (checkpointing and m.training)


def _cache_kwarg(model) -> str:
    """The forward argument carrying a KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return _cache_kwarg_of(type(_unwrap(model)))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


# Causal LMs whose logits are exactly lm_head(final hidden state): the LM head can then run on
# the real (non-padding) completion positions only. Others (logit soft-capping, logit scales)
# go through the model's own forward.
HEAD_SPLIT_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral"}


def _body_and_head(model):
    m = _unwrap(model)
    if hasattr(m, "get_base_model"):  # peft: the wrapped model, LoRA layers injected in place
        m = m.get_base_model()
    cfg = getattr(m, "config", None)
    if getattr(cfg, "model_type", None) in HEAD_SPLIT_MODEL_TYPES and hasattr(m, "model") and hasattr(m, "lm_head"):
        return m.model, m.lm_head
    return None, None


def _forward(model, body, keep: int, **kw):
    """(states of the last ``keep`` positions, output): final hidden states through ``body`` when
    the head is split off, else logits from the whole model."""
    if body is not None:
        out = body(**kw)
        return out.last_hidden_state[:, -keep:], out
    out = model(logits_to_keep=keep, **kw)
    return out.logits, out


def completion_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int,
                      share_prompts: bool = True, body=None) -> torch.Tensor:
    """States predicting the last C tokens of each row [N, C, ·]: final hidden states when
    ``body`` (the model without its LM head) is given, else logits."""
    P = input_ids.shape[1] - C
    if share_prompts and P > 0 and _can_share(model):
        key = torch.cat([input_ids[:, :P], attention_mask[:, :P].to(input_ids.dtype)], -1)  # [N, 2P]
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)  # [U, 2P], [N]
        if len(uniq) < len(key):
            return _shared_prompt_states(model, body, uniq[:, :P], uniq[:, P:].to(attention_mask.dtype), inverse,
                                         input_ids[:, P:], attention_mask)
    states, _ = _forward(model, body, C + 1, input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids(attention_mask), use_cache=False)
    return states[:, :-1]  # [N, C, ·]


def _shared_prompt_states(model, body, prompts: torch.Tensor, prompt_mask: torch.Tensor, inverse: torch.Tensor,
                          completions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``completion_states`` with each distinct prompt run once (see the module docstring);
    ``completions`` [N, C] are the completion columns of the rows."""
    C = completions.shape[1]
    name = _cache_kwarg(model)
    first_states, first = _forward(model, body, 1, input_ids=prompts, attention_mask=prompt_mask,
                                   position_ids=position_ids(prompt_mask), use_cache=True)
    states0 = first_states[inverse]  # [N, 1, ·] predicts completion token 0
    if C == 1:
        return states0
    cache = getattr(first, name, None) or getattr(first, "past_key_values", None)
    cache.batch_select_indices(inverse)  # [U, …] → [N, …], differentiable indexing
    L = attention_mask.shape[1]
    pos = position_ids(attention_mask)[:, L - C:L - 1]  # [N, C-1]
    rest, _ = _forward(model, body, C - 1, input_ids=completions[:, :C - 1], attention_mask=attention_mask[:, :L - 1],
                       position_ids=pos, use_cache=True, **{name: cache})
    return torch.cat([states0, rest], dim=1)  # [N, C, ·]


def _is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def real_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int,
                share_prompts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits [T, V] at the T real completion positions only (``attention_mask`` of the
    last C columns) and those positions as a bool mask [N, C]. With a split LM head, padding
    positions never reach the head (on short-answer tasks most of the padded width).

    A DeepSpeed engine is called whole, once (``logits_to_keep``): its backward bookkeeping hangs
    on hooks that its own ``forward`` puts on the outputs, so neither the split head nor the
    shared prompt forward (which call the model's parts) is used with it."""
    if _is_deepspeed(model):
        share_prompts = False
        body, head = None, None
    else:
        body, head = _body_and_head(model)
    real = attention_mask[:, -C:].bool()  # [N, C]
    states = completion_states(model, input_ids, attention_mask, C, share_prompts, body=body)  # [N, C, ·]
    picked = states[real]  # [T, ·]
    return (head(picked) if head is not None else picked).float(), real


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int,
                   with_entropy: bool = False, share_prompts: bool = True,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π_T of each of the last C tokens of ``input_ids`` [N, L] → [N, C] (0 at padding), and
    with ``with_entropy`` the entropy of π_T at each position (no gradient)."""
    logits, real = real_logits(model, input_ids, attention_mask, C, share_prompts)  # [T, V], [N, C]
    if temperature != 1.0:
        logits = logits / temperature  # [T, V] π_T ∝ exp(logits / T)
    targets = input_ids[:, -C:][real]  # [T]
    logz = torch.logsumexp(logits, dim=-1)  # [T]
    lp_real = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz  # [T]
    index = real.nonzero(as_tuple=True)
    lp = torch.zeros(real.shape, dtype=lp_real.dtype, device=lp_real.device).index_put(index, lp_real)  # [N, C]
    ent = None
    if with_entropy:
        with torch.no_grad():
            p = F.softmax(logits.detach(), dim=-1)  # [T, V]
            ent_real = logz.detach() - (p * logits.detach()).sum(-1)  # [T]
            ent = torch.zeros(real.shape, dtype=ent_real.dtype, device=ent_real.device).index_put(index, ent_real)
    return lp, ent


def _length_chunks(attention_mask: torch.Tensor, C: int, batch_size: int, by_prompt: bool = False):
    """Row chunks of similar length (longest first), each with the columns it needs:
    yields (rows, left, c) so that [:, left:P + c] holds every real token of those rows.
    ``by_prompt``: order by prompt length only (stable), so the rows of a group stay together
    and share their prompt forward."""
    L = attention_mask.shape[1]
    P = L - C
    lengths = attention_mask[:, :P].sum(-1) if by_prompt else attention_mask.sum(-1)  # [N]
    order = torch.argsort(lengths, descending=True, stable=True)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        am = attention_mask[rows]
        real = am[:, :P].any(0).nonzero()
        left = int(real[0]) if len(real) else P
        c = max(1, int(am[:, P:].sum(-1).max().item()))
        yield rows, left, c


@torch.no_grad()
def batched_logprobs(model, inputs: dict[str, torch.Tensor], C: int, batch_size: int, share_prompts: bool = True,
                     temperature: float = 1.0, with_entropy: bool = False):
    """No-grad log π_T [N, C] of ``inputs`` (``Rollouts.model_inputs``: input_ids, attention_mask
    [N, P + C]) in length-sorted chunks of ``batch_size`` rows, padding trimmed (reference /
    old-policy passes); with ``with_entropy`` a pair (logprobs, entropy), both [N, C]."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    P = input_ids.shape[1] - C
    out = torch.zeros(input_ids.shape[0], C, device=input_ids.device)
    ent = torch.zeros_like(out) if with_entropy else None
    for rows, left, c in _length_chunks(attention_mask, C, batch_size, by_prompt=share_prompts):
        lp, e = token_logprobs(model, input_ids[rows, left:P + c], attention_mask[rows, left:P + c], c,
                               with_entropy=with_entropy, share_prompts=share_prompts, temperature=temperature)
        out[rows, :c] = lp
        if with_entropy:
            ent[rows, :c] = e
    mask = attention_mask[:, P:]
    return (out * mask, ent * mask) if with_entropy else out * mask  # [N, C]


@torch.no_grad()
def exact_kl(policy, reference, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             completion_mask: torch.Tensor, batch_size: int, share_prompts: bool = True) -> torch.Tensor:
    """Exact per-token KL(π || π_ref) = Σ_v π log(π/π_ref), summed over the vocabulary, [N, C], of
    the models' own distributions (T = 1, whatever the rollouts' temperature: the held-out KL
    measures how far the model moved, not the sampler)."""
    C = completion_mask.shape[1]
    P = input_ids.shape[1] - C
    out = torch.zeros(input_ids.shape[0], C, device=input_ids.device)
    for rows, left, c in _length_chunks(attention_mask, C, batch_size, by_prompt=share_prompts):
        ids, am = input_ids[rows, left:P + c], attention_mask[rows, left:P + c]
        logits_p, real = real_logits(policy, ids, am, c, share_prompts)  # [T, V], [b, c]
        logits_q, _ = real_logits(reference, ids, am, c, share_prompts)  # [T, V]
        lp, lq = F.log_softmax(logits_p, -1), F.log_softmax(logits_q, -1)  # [T, V]
        block = torch.zeros(real.shape, device=out.device)  # [b, c]
        block[real] = (lp.exp() * (lp - lq)).sum(-1)
        out[rows, :c] = block
    return out * completion_mask  # [N, C]
