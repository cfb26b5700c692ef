"""Plugins for tests that run rlbench in other processes (``accelerate launch``, the CLI):
they load this module with RLBENCH_PLUGINS=rlbench_testing_plugins and tests/ on PYTHONPATH.
conftest registers the same task in-process."""
import json
from dataclasses import dataclass, field

import rlbench
from rlbench.training import dist
from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig
from rlbench.plugins.algorithms.reinforce_pp import ReinforcePP, ReinforcePPConfig
from rlbench.types import Prompt


@dataclass
class FirstCharConfig:
    pass


class FirstChar:
    """Reward 1 when the completion's first character is a lowercase letter: about
    a quarter of the samples of a random model with init std 0.3 (peaked enough that
    moving its few likely first tokens is learnable; at std 0.02 the output is uniform over 49k tokens)."""

    Config = FirstCharConfig

    def __init__(self, config, tokenizer):
        self.tok = tokenizer

    def prompts(self, split, n, seed):
        text = self.tok.apply_chat_template([{"role": "user", "content": "Say something."}], tokenize=False,
                                            add_generation_prompt=True)
        return [Prompt(id=f"{split}{i}", text=text, answer=None) for i in range(n)]

    def score(self, prompts, texts):
        return {"accuracy": [1.0 if t[:1].islower() else 0.0 for t in texts]}


@rlbench.hookimpl
def rlbench_tasks():
    return {"first_char": FirstChar, "first_char_long": FirstCharLong}


@dataclass
class FirstCharLongConfig:
    long_ids: list = field(default_factory=list)  # prompt ids whose text is made 20 times longer


class FirstCharLong(FirstChar):
    """FirstChar with some prompts far longer (``rollout.max_prompt_tokens`` then skips them)."""

    Config = FirstCharLongConfig

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.config = config

    def prompts(self, split, n, seed):
        return [Prompt(id=p.id, text=p.text * 20, answer=None) if p.id in self.config.long_ids else p
                for p in super().prompts(split, n, seed)]


@dataclass
class RankNaNConfig(GRPOConfig):
    nan_step: int = 0  # the loss is NaN on this step …
    nan_rank: int = 0  # … in this process only


class RankNaNGRPO(GRPO):
    Config = RankNaNConfig

    def loss(self, logp, batch, ctx):
        loss, metrics = super().loss(logp, batch, ctx)
        if ctx.step == self.config.nan_step and dist.rank() == self.config.nan_rank:
            loss = loss * float("nan")
        return loss, metrics


@dataclass
class RecordingReinforcePPConfig(ReinforcePPConfig):
    record_file: str = ""  # each rank appends what prepare() saw and made to <record_file>.rank<r>


class RecordingReinforcePP(ReinforcePP):
    """REINFORCE++ that records, per rank and step, the rewards and completion lengths prepare()
    saw and the advantages it made (real tokens, row by row)."""

    Config = RecordingReinforcePPConfig

    def prepare(self, rollouts, rewards, ctx):
        batch = super().prepare(rollouts, rewards, ctx)
        mask = rollouts.completion_mask.bool()
        rec = {"step": ctx.step, "ids": [rollouts.prompts[g].id for g in rollouts.group.tolist()],
               "rewards": rewards.tolist(), "lengths": mask.sum(-1).tolist(),
               "advantages": [batch["advantages"][i][mask[i]].tolist() for i in range(rollouts.n)]}
        with open(f"{self.config.record_file}.rank{dist.rank()}", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return batch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"rank_nan_grpo": RankNaNGRPO, "recording_reinforce_pp": RecordingReinforcePP}


@rlbench.hookimpl
def rlbench_on_step_end(step, metrics):
    """RLBENCH_TEST_STEP_SECONDS=S: every step lasts at least S seconds longer (a run that
    reliably outlives a short scheduler time limit, whatever the machine's speed)."""
    import os
    import time

    seconds = float(os.environ.get("RLBENCH_TEST_STEP_SECONDS", "0") or 0)
    if seconds:
        time.sleep(seconds)
