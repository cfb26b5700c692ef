"""Plugins for tests that run rlbench in other processes (``accelerate launch``, the CLI):
they load this module with RLBENCH_PLUGINS=rlbench_testing_plugins and tests/ on PYTHONPATH.
conftest registers the same task in-process."""
from dataclasses import dataclass

import rlbench
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
    return {"first_char": FirstChar}
