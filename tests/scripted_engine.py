"""A rollout engine that emits fixed text: turn k of every trajectory samples ``script[k]`` (its
tokens, then the end-of-turn token), with logprob −(position + 1)/100 at each position of the
turn, so tests can check the token layout of multi-turn trajectories exactly."""
from dataclasses import dataclass, field

import torch

import rlbench
from rlbench.modeling.models import stop_token_ids
from rlbench.types import Rollouts


@dataclass
class ScriptedConfig:
    script: list = field(default_factory=lambda: ["hello"])
    cut: int = 0  # > 0: turns stop after this many tokens (finish "length"), as at a token limit


class ScriptedEngine:
    Config = ScriptedConfig

    def __init__(self, config, model, tokenizer, device, seed=0):
        self.config, self.tok = config, tokenizer
        self.end = stop_token_ids(tokenizer)[-1]
        self.calls = []  # the prompt token ids of every call

    def sync(self, model):
        pass

    def tokens(self, turn: int) -> list[int]:
        text = self.config.script[min(turn, len(self.config.script) - 1)]
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.end]
        return ids[:self.config.cut] if self.config.cut else ids

    def generate(self, prompts, n, sampling):
        prompt_ids = [list(p.token_ids) if p.token_ids is not None else self.tok(p.text, add_special_tokens=False)["input_ids"]
                      for p in prompts]
        self.calls.append(prompt_ids)
        rows = []
        for p in prompts:
            turn = int(p.id.rsplit("/", 1)[1]) if p.token_ids is not None else 0
            rows += [self.tokens(turn)[:sampling.max_tokens]] * n
        C = max(len(r) for r in rows)
        ids = torch.full((len(rows), C), self.tok.pad_token_id)
        mask, lps = torch.zeros(len(rows), C), torch.zeros(len(rows), C)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            lps[i, :len(r)] = -(torch.arange(len(r)) + 1) / 100
        return Rollouts(prompts=list(prompts), prompt_ids=prompt_ids, group=torch.arange(len(prompts)).repeat_interleave(n),
                        completion_ids=ids, completion_mask=mask, sampler_logprobs=lps,
                        texts=self.tok.batch_decode(rows, skip_special_tokens=True),
                        finish_reasons=["stop" if r[-1] == self.end else "length" for r in rows],
                        pad_id=self.tok.pad_token_id)


@rlbench.hookimpl
def rlbench_rollout_engines():
    return {"scripted": ScriptedEngine}
