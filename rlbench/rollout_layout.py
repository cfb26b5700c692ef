"""How ``Rollouts``' tensors are laid out (rlbench/types.py delegates these methods here): a
selection of prompt groups, concatenation with re-padding, rollouts packed from token lists that
were not sampled, and the left-padded prompt + right-padded completion a forward pass takes.

Not covered: packing several sequences into one row (every row is one prompt + one completion).
"""
from __future__ import annotations

import torch


def select_groups(ro, keep: list[int]):
    """The rollouts of prompts ``keep`` (indices into ``prompts``), in that order, re-indexed."""
    rows = torch.cat([(ro.group == g).nonzero().view(-1) for g in keep]) if keep else torch.zeros(0, dtype=torch.long)
    new_index = {g: i for i, g in enumerate(keep)}
    return type(ro)(
        prompts=[ro.prompts[g] for g in keep], prompt_ids=[ro.prompt_ids[g] for g in keep],
        group=torch.tensor([new_index[g] for g in ro.group[rows].tolist()], dtype=torch.long),
        completion_ids=ro.completion_ids[rows], completion_mask=ro.completion_mask[rows],
        sampler_logprobs=None if ro.sampler_logprobs is None else ro.sampler_logprobs[rows],
        texts=[ro.texts[i] for i in rows.tolist()], finish_reasons=[ro.finish_reasons[i] for i in rows.tolist()],
        pad_id=ro.pad_id, env_mask=None if ro.env_mask is None else ro.env_mask[rows],
        turns=None if ro.turns is None else [ro.turns[i] for i in rows.tolist()],
        turn_rewards=None if ro.turn_rewards is None else ro.turn_rewards[rows])


def from_token_lists(cls, prompts: list, prompt_ids: list[list[int]], group: list[int], completions: list[list[int]],
                     texts: list[str], finish_reasons: list[str], pad_id: int):
    """Rollouts of completions that were not sampled (offline data: preference pairs, reference
    solutions): token lists right-padded to the longest, no sampler logprobs."""
    C = max([len(c) for c in completions] + [1])
    ids = torch.full((len(completions), C), pad_id, dtype=torch.long)  # [N, C]
    mask = torch.zeros((len(completions), C))  # [N, C]
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1.0
    return cls(prompts=prompts, prompt_ids=prompt_ids, group=torch.tensor(group, dtype=torch.long),
               completion_ids=ids, completion_mask=mask, sampler_logprobs=None, texts=texts,
               finish_reasons=finish_reasons, pad_id=pad_id)


def cat(parts: list):
    """Concatenate rollouts of different prompts (completions re-padded to the longest)."""
    C = max(r.completion_ids.shape[1] for r in parts)

    def pad(t: torch.Tensor, value) -> torch.Tensor:  # [n, c] -> [n, C]
        return torch.nn.functional.pad(t, (0, C - t.shape[1]), value=value)

    offsets = [0]
    for r in parts[:-1]:
        offsets.append(offsets[-1] + len(r.prompts))
    has_lp = all(r.sampler_logprobs is not None for r in parts)
    any_env = any(r.env_mask is not None for r in parts)
    return type(parts[0])(
        prompts=[p for r in parts for p in r.prompts], prompt_ids=[p for r in parts for p in r.prompt_ids],
        group=torch.cat([r.group + o for r, o in zip(parts, offsets)]),
        completion_ids=torch.cat([pad(r.completion_ids, parts[0].pad_id) for r in parts]),
        completion_mask=torch.cat([pad(r.completion_mask, 0) for r in parts]),
        sampler_logprobs=torch.cat([pad(r.sampler_logprobs, 0.0) for r in parts]) if has_lp else None,
        texts=[t for r in parts for t in r.texts], finish_reasons=[f for r in parts for f in r.finish_reasons],
        pad_id=parts[0].pad_id,
        env_mask=torch.cat([pad(r.env_mask if r.env_mask is not None else torch.zeros_like(r.completion_mask), 0)
                            for r in parts]) if any_env else None,
        turns=[t for r in parts for t in (r.turns or [{} for _ in range(r.n)])] if any_env else None,
        turn_rewards=torch.cat([pad(r.turn_rewards if r.turn_rewards is not None else torch.zeros_like(r.completion_mask), 0)
                                for r in parts]) if any(r.turn_rewards is not None for r in parts) else None)


def model_inputs(ro) -> dict[str, torch.Tensor]:
    """Left-padded prompt + right-padded completion, ready for a forward pass."""
    P = max(len(p) for p in ro.prompt_ids)
    N, C = ro.completion_ids.shape
    prompt = torch.full((N, P), ro.pad_id, dtype=torch.long)  # [N, P]
    pmask = torch.zeros((N, P), dtype=torch.long)  # [N, P]
    for i, g in enumerate(ro.group.tolist()):
        ids = ro.prompt_ids[g]
        prompt[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        pmask[i, P - len(ids):] = 1
    input_ids = torch.cat([prompt, ro.completion_ids], dim=1)  # [N, L]
    attention_mask = torch.cat([pmask, ro.attention().long()], dim=1)  # [N, L] environment tokens included
    return {"input_ids": input_ids, "attention_mask": attention_mask}
