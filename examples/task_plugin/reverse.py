"""A task a dataset spec cannot express: problems generated on the fly (RLBENCH_PLUGINS=reverse)."""
import random
from dataclasses import dataclass

import rlbench
from rlbench.tasks.answers import extract
from rlbench.types import Prompt


@dataclass
class ReverseConfig:
    length: int = 5  # letters per word


class Reverse:
    Config = ReverseConfig  # the task's config section; unknown keys are rejected

    def __init__(self, config: ReverseConfig, tokenizer):
        self.config, self.tok = config, tokenizer

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(seed if split == "train" else 0)  # the test set never depends on the seed
        letters = "abcdefghij" if split == "train" else "klmnopqrst"  # disjoint splits
        words = ["".join(rng.choice(letters) for _ in range(self.config.length)) for _ in range(n)]
        return [Prompt(id=f"{split}/{w}", text=self.tok.apply_chat_template(
            [{"role": "user", "content": f"Reverse the word {w}. Answer inside <answer></answer> tags."}],
            tokenize=False, add_generation_prompt=True), answer=w[::-1], meta={"question": w}) for w in words]

    def score(self, prompts: list[Prompt], texts: list[str]) -> dict[str, list[float]]:
        said = [extract(t, "tags") for t in texts]  # the single <answer> block, else None
        return {"accuracy": [float(s is not None and s.strip() == p.answer) for p, s in zip(prompts, said)]}

    def gold(self, prompt: Prompt) -> str:  # optional: the reference as a completion (task check)
        return f"<answer>{prompt.answer}</answer>"


@rlbench.hookimpl
def rlbench_tasks():
    return {"reverse": Reverse}
