"""Task ``humaneval``: write a Python function from its signature and docstring (Chen et al. 2021), 164 problems.

Data: tasks/data/humaneval (MIT, openai/human-eval), or ``test_file`` (JSONL
with ``task_id``, ``prompt``, ``entry_point``, ``test``). All 164 problems are
the test split; ``train_fraction`` > 0 moves a hash-chosen share of them to a
train split for RL on code (the two never overlap).

Prompts: chat models get the function in a fenced block and are asked for the
whole function (in a ```python block, inside ``<answer>`` tags); base models
(``chat_template: false``) get the raw HumanEval prompt and continue the body.

Accuracy: the completion's code run against the problem's tests in the
sandbox (``rlbench.tasks.sandbox``), 1 when every test passes. The code is the
fenced block (inside the single answer block when there is one) that defines
the entry point, else any fenced block, else the text itself when it defines
the entry point, else a body continuation cut at the first top-level
``def``/``class``/``if``/``print``/``#`` line (the HumanEval stop sequences). The
problem's prompt is prepended (imports and helper functions), so a whole
function replaces the prompt's stub. Tests run outside the sandbox against a
plain-data proxy of the function; programs run ``sandbox_workers`` at a time.

Not covered: several samples of a problem sharing one sandbox; non-Python tasks.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import rlbench
from rlbench.tasks import sandbox
from rlbench.tasks.common import DATA, DatasetTask, PromptConfig, answer_block, chat_messages, chat_prompt, load_split, stable_fraction
from rlbench.types import DataError, Prompt


@rlbench.hookimpl
def rlbench_tasks():
    return {"humaneval": "rlbench.tasks.humaneval:HumanEval"}


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_STOP = re.compile(r"^(?:def |class |if |print\(|#)", re.M)


@dataclass
class HumanEvalConfig(PromptConfig):
    instruction: str = ("Write the complete function in a ```python code block, inside <answer></answer> tags.")
    train_fraction: float = 0.0  # > 0: this share of the problems (by task_id hash) forms a train split
    timeout_s: float = 10.0  # per program: load plus every test call
    memory_mb: int = 1024
    sandbox_workers: int = 4  # programs run in parallel
    sandbox_allow_weak: bool = False  # accept running code without bubblewrap (rlimits only; network reachable)

    def validate(self):
        super().validate()
        if not 0.0 <= self.train_fraction < 1.0:
            raise ValueError("train_fraction must be in [0, 1)")
        if self.timeout_s <= 0 or self.sandbox_workers < 1:
            raise ValueError("timeout_s must be > 0 and sandbox_workers >= 1")


def program_from(text: str, prompt_code: str, entry_point: str) -> str | None:
    """The program to test for a completion, or None (several answer blocks)."""
    content, n = answer_block(text)
    if n > 1 or (n == 1 and content is None):
        return None
    body = content if n == 1 else text
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
    fences = _FENCE.findall(body)
    if fences:
        code = next((f for f in fences if defines.search(f)), fences[0])
        return prompt_code + "\n" + code if defines.search(code) else prompt_code + code
    if defines.search(body):
        return prompt_code + "\n" + body
    m = _STOP.search(body)
    return prompt_code + (body[:m.start()] if m else body)


class HumanEval(DatasetTask):
    Config = HumanEvalConfig
    FILES = {"test": DATA / "humaneval" / "HumanEval.jsonl"}

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.isolation = sandbox.require(config.sandbox_allow_weak)
        self.limits = sandbox.Limits(timeout_s=config.timeout_s, memory_mb=config.memory_mb)
        self.by_id = {r["task_id"]: r for r in self._all()}

    def _all(self):
        rows = load_split(self.config, "test", self.FILES, ("task_id", "prompt", "entry_point", "test"))
        return rows

    def _records(self, split):
        c = self.config
        if split not in ("train", "test"):
            raise DataError(f"humaneval has splits 'test' (and 'train' with train_fraction > 0), not {split!r}")
        if split == "train" and c.train_fraction <= 0:
            raise DataError("humaneval has no train split: set task.train_fraction (e.g. 0.5) to train on a share "
                            "of the problems and evaluate on the rest")
        rows = list(self.by_id.values())
        if c.train_fraction > 0:
            is_train = [stable_fraction(r["task_id"]) < c.train_fraction for r in rows]
            rows = [r for r, t in zip(rows, is_train) if t == (split == "train")]
        return rows

    def _prompt(self, r) -> Prompt:
        code = r["prompt"]
        user = "Complete the following Python function. " + self.config.instruction + f"\n\n```python\n{code}```"
        text, prefilled = chat_prompt(self.tok, self.config, user, base_text=code)
        return Prompt(id=r["task_id"], text=text, answer=r["task_id"], meta={"prefilled_think": prefilled, "messages": chat_messages(self.config, user)})

    def gold(self, prompt: Prompt) -> str | None:
        """The canonical solution as a completion (``rlbench task check``); None without one."""
        r = self.by_id.get(prompt.answer, {})
        if not r.get("canonical_solution"):
            return None
        return f"<answer>```python\n{r['prompt']}{r['canonical_solution']}```</answer>"

    def manifest_info(self) -> dict:
        return {"sandbox": self.isolation}

    def verdict(self, task_id: str, text: str) -> sandbox.Verdict:
        r = self.by_id.get(task_id)
        if r is None:
            raise DataError(f"unknown humaneval task_id {task_id!r}")
        program = program_from(text, r["prompt"], r["entry_point"])
        if program is None:
            return sandbox.Verdict(False, "several answer blocks", 0.0)
        return sandbox.check_function(program, r["entry_point"], r["test"], trusted_prelude=r["prompt"],
                                      limits=self.limits, level=self.isolation["level"])

    def correct(self, prompts, texts):
        with ThreadPoolExecutor(self.config.sandbox_workers) as ex:
            verdicts = list(ex.map(self.verdict, [p.answer for p in prompts], texts))
        return [v.passed for v in verdicts]

    @staticmethod
    def reference(row: dict):
        return str(row["task_id"])
