"""Rollout engine ``hf``: transformers ``generate`` on the policy itself.

Batched with left padding, n samples per prompt (group-major rows), stops at
EOS or the chat end-of-turn token, and reports each sampled token's logprob
under π_T, log_softmax(logits / T) of the unprocessed logits at the sampling
temperature T (greedy decoding: T = 1), top-p not applied — the trainer's
convention (rlbench/modeling/logprobs.py), so the two compare like with like. It samples from the live policy module,
so ``sync`` has nothing to copy: its weights are never stale. (Under DeepSpeed ZeRO-3 the
trainer hands it a whole copy of the weights, refreshed at every sync.)

With ``Sampling.seed`` set (``rollout.batch_invariant_sampling``) each prompt is generated in
a call of its own from a generator seeded by (seed, prompt id): the samples then do not depend
on which other prompts share the batch, the shard or the world size (slower: no batching
across prompts).

Not covered: speculative decoding, prefix caching across groups (each of the
G samples re-encodes its prompt; vLLM's engine shares it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlbench
from rlbench.modeling.models import stop_token_ids
from rlbench.seeds import prompt_seed
from rlbench.types import Prompt, Rollouts, Sampling


@rlbench.hookimpl
def rlbench_rollout_engines():
    return {"hf": "rlbench.plugins.engines.hf:HFEngine"}


@dataclass
class HFConfig:
    batch_size: int = 64  # sequences per generate call (bounds the stored logits: batch × tokens × vocab)

    def validate(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


class HFEngine:
    Config = HFConfig
    determinism = "bitwise"  # on a CPU in float32: the determinism test reruns a config bit for bit

    def __init__(self, config: HFConfig, model, tokenizer, device, seed: int = 0):
        # sampling draws from torch's global RNG, which the trainer seeds and checkpoints
        self.config = config
        self.model = model
        self.tok = tokenizer
        self.device = device
        self.stops = stop_token_ids(tokenizer)

    def sync(self, model) -> None:
        self.model = model  # generates from the live policy: nothing to copy

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> Rollouts:
        tok = self.tok
        prompt_ids = [list(p.token_ids) if p.token_ids is not None else tok(p.text, add_special_tokens=False)["input_ids"]
                      for p in prompts]  # token ids as given: a multi-turn continuation is never re-tokenized
        rows = [g for g in range(len(prompts)) for _ in range(n)]  # group-major
        per_call = max(1, self.config.batch_size // n) if n <= self.config.batch_size else 1
        pieces = []
        was_training = self.model.training
        self.model.eval()
        try:
            if sampling.seed is not None and not sampling.greedy:
                # batch-invariant: one call per prompt, its own seed, the global RNG left as it was
                for prompt, ids in zip(prompts, prompt_ids):
                    with torch.random.fork_rng(devices=[self.device] if torch.device(self.device).type == "cuda" else []):
                        torch.manual_seed(prompt_seed(sampling.seed, prompt.id))
                        pieces.append(self._generate([ids], n, sampling))
            else:
                for s in range(0, len(prompts), per_call):
                    pieces.append(self._generate(prompt_ids[s:s + per_call], n, sampling))
        finally:
            self.model.train(was_training)
        C = max(p[0].shape[1] for p in pieces)
        pad = tok.pad_token_id

        def padto(t, value):
            return torch.nn.functional.pad(t, (0, C - t.shape[1]), value=value)

        ids = torch.cat([padto(p[0], pad) for p in pieces])  # [N, C]
        mask = torch.cat([padto(p[1], 0.0) for p in pieces])  # [N, C]
        lps = torch.cat([padto(p[2], 0.0) for p in pieces])  # [N, C]
        finish = [f for p in pieces for f in p[3]]
        texts = tok.batch_decode([r[: int(m.sum())].tolist() for r, m in zip(ids, mask)], skip_special_tokens=True)
        return Rollouts(prompts=list(prompts), prompt_ids=prompt_ids, group=torch.tensor(rows), completion_ids=ids,
                        completion_mask=mask, sampler_logprobs=lps, texts=texts, finish_reasons=finish, pad_id=pad)

    def _generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling):
        tok = self.tok
        P = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), P), tok.pad_token_id, dtype=torch.long)  # [b, P]
        attn = torch.zeros_like(input_ids)  # [b, P]
        for i, p in enumerate(prompt_ids):
            input_ids[i, P - len(p):] = torch.tensor(p)
            attn[i, P - len(p):] = 1
        kwargs = dict(do_sample=False) if sampling.greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        input_ids, attn = input_ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)  # [b*n, P] group-major
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device),
            max_new_tokens=sampling.max_tokens, eos_token_id=self.stops,
            pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=sampling.logprobs,
            synced_gpus=False,  # whole weights on every rank: no lock-step with the others (transformers' ZeRO-3 default)
            **kwargs)
        comp = out.sequences[:, P:].cpu()  # [b*n, C]
        if sampling.logprobs:
            T = 1.0 if sampling.greedy else sampling.temperature
            lp = torch.zeros(comp.shape)  # [b*n, C]
            for t, step_logits in enumerate(out.logits):  # raw logits [b*n, V], before temperature/top-p
                lp[:, t] = torch.log_softmax(step_logits.float() / T, -1).gather(
                    -1, comp[:, t:t + 1].to(step_logits.device)).squeeze(-1).cpu()  # log π_T
        else:
            lp = torch.zeros(comp.shape)
        is_stop = torch.zeros_like(comp, dtype=torch.bool)
        for s in self.stops:
            is_stop |= comp == s
        # Real tokens: up to and including the first stop token.
        before_stop = (is_stop.long().cumsum(-1) - is_stop.long()) == 0  # [b*n, C]
        mask = before_stop.float()
        finish = ["stop" if r.any() else "length" for r in is_stop]
        comp = torch.where(before_stop, comp, torch.full_like(comp, tok.pad_token_id))
        return comp, mask, lp * mask, finish
