"""Environment ``retry``: any single-turn task as several attempts with feedback.

After an answer the task's verifier does not accept, the model is told so (``feedback``) and
answers again, up to ``env.max_turns`` attempts; the trajectory ends at the first accepted answer.
The reward is the task's score of the final attempt, its accuracy multiplied by ``discount`` per
earlier attempt (1.0: a late right answer is worth as much as a first one). This is the
self-correction setting (the R1 paper's "aha moment": the model revisiting its answer), with any
task, ``dataset`` specs included.

Not covered: feedback that says how the answer is wrong (only that it is).
"""
from __future__ import annotations

from dataclasses import dataclass

import rlbench
from rlbench.types import Prompt


@rlbench.hookimpl
def rlbench_environments():
    return {"retry": "rlbench.plugins.environments.retry:RetryEnv"}


@dataclass
class RetryConfig:
    feedback: str = "That answer is incorrect. Think again and give your final answer."
    discount: float = 1.0  # accuracy × discount^(attempts − 1)

    def validate(self):
        if not 0 < self.discount <= 1:
            raise ValueError("discount must be in (0, 1]")


class RetryEnv:
    Config = RetryConfig

    def __init__(self, options: RetryConfig, task):
        self.options, self.task = options, task
        self.prompt: Prompt | None = None
        self.scores: list[dict] = []  # each attempt's reward components

    def reset(self, **row) -> None:
        self.prompt = Prompt(id=row.pop("prompt_id"), text="", answer=row.pop("answer"), meta=row)
        self.scores = []
        return None

    def step(self, text: str):
        score = {k: v[0] for k, v in self.task.score([self.prompt], [text]).items()}
        self.scores.append(score)
        if score.get("accuracy", 0.0) >= 1.0:
            return None, True
        return self.options.feedback, False

    def get_reward(self) -> dict[str, float]:
        if not self.scores:
            return {"accuracy": 0.0}
        final = dict(self.scores[-1])
        final["accuracy"] = final.get("accuracy", 0.0) * self.options.discount ** (len(self.scores) - 1)
        return final

    @property
    def accuracies(self) -> list[float]:
        """Each attempt's accuracy (a property, so not a tool)."""
        return [s.get("accuracy", 0.0) for s in self.scores]
