import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {
    "run": {"name": "t", "seed": 0},
    "model": {"name": "tiny-random"},
    "task": {"name": "arithmetic", "digits": 2},
    "engine": {"name": "hf"},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_tokens": 8},
    "algorithm": {"name": "grpo"},
    "train": {"steps": 2, "lr": 1e-3, "checkpoint_every": 0, "micro_batch_size": 8},
    "eval": {"n": 8, "max_tokens": 8, "before": False, "after": False},
    "logging": {"loggers": [], "progress": False},
}


def tiny_config(*overrides: str, **sections: dict):
    """The tiny-random test config: whole sections replaced by keyword, then ``section.key=value`` overrides."""
    from rlbench import config

    return config.resolve({**TINY, **sections}, list(overrides))


@pytest.fixture(scope="session")
def tokenizer():
    from rlbench import models

    return models.load_tokenizer("tiny-random")


# -- a task the tiny random model can learn (registered at run time, like a notebook would) --

from dataclasses import dataclass  # noqa: E402

import rlbench  # noqa: E402
from rlbench.types import Prompt  # noqa: E402


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
        return [Prompt(id=f"p{i}", text=text, answer=None) for i in range(n)]

    def score(self, prompts, texts):
        return {"accuracy": [1.0 if t[:1].islower() else 0.0 for t in texts]}


class FirstCharPlugin:
    @rlbench.hookimpl
    def rlbench_tasks(self):
        return {"first_char": FirstChar}


@pytest.fixture
def first_char_task():
    from rlbench import manager

    name = manager.register(FirstCharPlugin(), name="first_char_test")
    yield
    manager.unregister(name)
