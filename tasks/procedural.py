"""Task ``reasoning_gym``: any of reasoning-gym's ~100 procedural datasets, scored by its own scorer.

    task:
      name: reasoning_gym
      dataset: chain_sum                         # reasoning_gym.factory.DATASETS names them
      config: {min_terms: 2, max_terms: 3, min_digits: 1, max_digits: 2}   # its difficulty settings
      size: 2000                                 # train problems

reasoning-gym (https://github.com/open-thought/reasoning-gym) generates problems from a seed and
scores an answer string with the dataset's ``score_answer`` (1.0 right; some datasets give
partial credit, which ``accuracy`` keeps). The held-out set is generated from ``test_seed`` (the
same for every run), the train set from ``data_seed``; a train problem whose question also occurs
in the held-out set is dropped, so the two are disjoint. Any ``config`` option is a suite factor:
``matrix.variant: [{label: easy, set: ["task.config={max_terms: 2}"]}, ...]``.

The answer is read from the completion with ``extract`` (rlbench.tasks.answers; the single
``<answer>`` block, else the last line, by default); format and overlong rewards as in the
other tasks.

When to use which: the built-in ``arithmetic`` task is the quickstart's (its figures in the
README and reports are measured on it; it enumerates a small problem space exactly, so its
held-out set is every remaining problem); ``reasoning_gym`` for any other procedural skill, or
arithmetic at difficulties ``arithmetic`` cannot set.

Not covered: reasoning-gym's composite datasets (``composite``) and its curricula (difficulty
that changes during a run).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import rlbench
from rlbench.tasks import answers
from rlbench.tasks.common import PromptConfig, chat_messages, chat_prompt, components
from rlbench.types import DataError, Prompt


@rlbench.hookimpl
def rlbench_tasks():
    return {"reasoning_gym": "rlbench.tasks.procedural:ReasoningGym"}


@dataclass
class ReasoningGymConfig(PromptConfig):
    dataset: str = "chain_sum"  # a reasoning-gym dataset name
    config: dict = field(default_factory=dict)  # the dataset's own options (difficulty)
    size: int = 2000  # train problems generated (drawn with the run seed, with replacement)
    test_size: int = 200  # held-out problems
    data_seed: int = 0  # the train set's generator seed
    test_seed: int = 12345  # the held-out set's: the same for every run
    instruction: str = "Put the final answer inside <answer></answer> tags."
    extract: str = "tags_or_last_line"  # how the answer string handed to the scorer is read

    def validate(self):
        super().validate()
        if self.size < 1 or self.test_size < 1:
            raise ValueError("size and test_size must be >= 1")
        if self.data_seed == self.test_seed:
            raise ValueError("data_seed and test_seed must differ (the held-out set is generated from test_seed)")
        reason = answers.check_mode(self.extract)
        if reason:
            raise ValueError(reason)
        try:
            import reasoning_gym
        except ImportError:
            raise ValueError("the reasoning_gym task needs the reasoning-gym package (pip install reasoning-gym)") from None
        names = sorted(reasoning_gym.factory.DATASETS)
        if self.dataset not in names:
            import difflib

            near = difflib.get_close_matches(self.dataset, names, n=3)
            raise ValueError(f"reasoning-gym has no dataset {self.dataset!r}"
                             + (f"; did you mean {', '.join(map(repr, near))}?" if near else ""))


class ReasoningGym:
    Config = ReasoningGymConfig

    def __init__(self, config: ReasoningGymConfig, tokenizer):
        self.config = config
        self.tok = tokenizer
        self.test = self._generate(config.test_size, config.test_seed)
        held_out = {e["question"] for e in self.test.entries}
        train = self._generate(config.size, config.data_seed)
        self.train_entries = [e for e in train.entries if e["question"] not in held_out]
        if not self.train_entries:
            raise DataError(f"reasoning_gym {config.dataset}: every train problem also occurs in the held-out set")
        self.dropped = len(train.entries) - len(self.train_entries)
        self.scorer = self.test  # score_answer depends on the dataset and its config, not on the seed

    def _generate(self, size: int, seed: int):
        import reasoning_gym

        try:
            ds = reasoning_gym.create_dataset(self.config.dataset, size=size, seed=seed, **self.config.config)
        except (TypeError, ValueError, AssertionError) as e:  # an unknown or out-of-range option
            raise DataError(f"reasoning_gym {self.config.dataset} with config {self.config.config}: "
                            f"{type(e).__name__}: {e}") from None

        class Entries:
            def __init__(self, ds):
                self.ds = ds
                self.entries = [ds[i] for i in range(size)]

            def score(self, answer, entry):
                return float(self.ds.score_answer(answer, entry))

        return Entries(ds)

    def size(self, split: str) -> int:
        return len(self._split(split))

    def _split(self, split: str) -> list[dict]:
        if split == "train":
            return self.train_entries
        if split == "test":
            return self.test.entries
        raise DataError(f"reasoning_gym has splits 'train' and 'test', not {split!r}")

    def _prompt(self, split: str, index: int) -> Prompt:
        entry = self._split(split)[index]
        user = entry["question"] + (f"\n{self.config.instruction}" if self.config.instruction else "")
        text, prefilled = chat_prompt(self.tok, self.config, user)
        return Prompt(id=f"{self.config.dataset}/{split}/{index}", text=text, answer=str(entry["answer"]),
                      meta={"question": entry["question"], "prefilled_think": prefilled, "messages": chat_messages(self.config, user)})

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]:
        """``test``: the first n held-out problems; ``train``: n drawn with the run seed."""
        k = self.size(split)
        if split == "test":
            return [self._prompt(split, i) for i in range(min(n, k))]
        rng = random.Random(seed)
        return [self._prompt(split, rng.randrange(k)) for _ in range(n)]

    def all_prompts(self, split: str) -> list[Prompt]:
        return [self._prompt(split, i) for i in range(self.size(split))]

    def _entry(self, prompt: Prompt) -> dict:
        _, split, index = prompt.id.rsplit("/", 2)
        return self._split(split)[int(index)]

    def score(self, prompts: list[Prompt], texts: list[str]) -> dict[str, list[float]]:
        c = self.config
        acc = [self.scorer.score(answers.extract(t, c.extract), self._entry(p)) for p, t in zip(prompts, texts)]
        return components(c, self.tok, prompts, texts, acc)

    def gold(self, prompt: Prompt) -> str:
        return answers.gold_completion(str(prompt.answer), "tags")

    def manifest_info(self) -> dict:
        import reasoning_gym

        return {"reasoning_gym": getattr(reasoning_gym, "__version__", "?"), "train_dropped_as_held_out": self.dropped}
