"""Task ``gsm8k``: grade-school math word problems (Cobbe et al. 2021), train 7,473 / test 1,319.

Data: tasks/data/gsm8k (MIT, openai/grade-school-math; see tasks/data/README.md),
or ``train_file`` / ``test_file`` (JSONL with ``question`` and ``answer``), or a
Hugging Face dataset (``hf_dataset: openai/gsm8k``, ``hf_config: main``).

Accuracy: the number of the final answer equals the reference. The final
answer is the single ``<answer>`` block when there is one, else (``answer_mode:
tags_or_last_number``) the text after the last ``####`` or "the answer is", else
the whole completion; the number read is the last one in it. Read as numbers:
``1,234`` (thousands separators), ``$18.00``, ``18.`` (trailing period), ``25%``,
``−3`` (Unicode minus), ``3 apples`` (units). Compared exactly as rationals, so
``18.00`` = ``18`` but ``18.5`` ≠ ``18``. Several answer blocks score 0.
References come in the dataset's worked-solution form ending ``#### N``; ``gold`` writes that
solution (calculator annotations ``<<48/2=24>>`` removed) as a completion in the answer format:
the task check's self-check and sft's demonstrations.

Not covered: answers written in words ("five"), fractions like ``3/4`` (GSM8K
answers are integers; ``3/4`` reads as 4).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import rlbench
from rlbench.tasks import verifiers
from rlbench.tasks.common import DATA, DatasetTask, PromptConfig, answer_block, chat_messages, chat_prompt, load_split
from rlbench.types import Prompt


@rlbench.hookimpl
def rlbench_tasks():
    return {"gsm8k": "rlbench.tasks.gsm8k:GSM8K"}


_FINAL = re.compile(r"(?:####|the (?:final )?answer is)", re.I)
_CALC = re.compile(r"<<[^<>]*>>")


@dataclass
class GSM8KConfig(PromptConfig):
    instruction: str = "Put the final number inside <answer></answer> tags."  # appended to the question
    answer_mode: str = "tags_or_last_number"  # tags | tags_or_last_number

    def validate(self):
        super().validate()
        if self.answer_mode not in ("tags", "tags_or_last_number"):
            raise ValueError("answer_mode must be 'tags' or 'tags_or_last_number'")


def parse_number(text: str) -> Fraction | None:
    """The last number in ``text`` as an exact rational, or None (the ``numeric`` verifier's parser)."""
    return verifiers.number(text)


def reference_number(answer: str) -> Fraction | None:
    """The reference from the dataset's ``… #### 72`` form (or a bare number)."""
    tail = answer.rsplit("####", 1)[-1]
    return parse_number(tail)


def final_answer(text: str, mode: str) -> str | None:
    content, n = answer_block(text)
    if n:
        return content  # None when hedging with several blocks
    if mode == "tags":
        return None
    parts = _FINAL.split(text)
    return parts[-1] if len(parts) > 1 else text


def is_correct(text: str, reference: Fraction | None, mode: str = "tags_or_last_number") -> bool:
    ans = final_answer(text, mode)
    if ans is None or reference is None:
        return False
    value = parse_number(ans)
    return value is not None and value == reference


class GSM8K(DatasetTask):
    Config = GSM8KConfig
    FILES = {"train": DATA / "gsm8k" / "train.jsonl", "test": DATA / "gsm8k" / "test.jsonl"}

    def _records(self, split):
        rows = load_split(self.config, split, self.FILES, ("question", "answer"))
        return [(f"{split}/{i}", r["question"], r["answer"]) for i, r in enumerate(rows)]

    def _prompt(self, rec) -> Prompt:
        i, question, answer = rec
        user = question + (f" {self.config.instruction}" if self.config.instruction else "")
        text, prefilled = chat_prompt(self.tok, self.config, user)
        return Prompt(id=f"gsm8k/{i}", text=text, answer=str(reference_number(answer)),
                      meta={"question": question, "prefilled_think": prefilled, "messages": chat_messages(self.config, user),
                            "solution": _CALC.sub("", answer.rsplit("####", 1)[0]).strip()})

    def gold(self, prompt: Prompt) -> str:
        """The dataset's worked solution as a completion: reasoning in the think block, the number
        in the answer tags (the think block already open when the prompt pre-fills it)."""
        think = prompt.meta.get("solution") or "The reference answer."
        opening = "" if prompt.meta.get("prefilled_think") else "<think>"
        return f"{opening}{think}</think>\n<answer>{prompt.answer}</answer>"

    def correct(self, prompts, texts):
        mode = self.config.answer_mode
        return [is_correct(t, Fraction(p.answer) if p.answer != "None" else None, mode) for p, t in zip(prompts, texts)]

    @staticmethod
    def reference(row: dict):
        """The reference a scored JSONL line carries (``rlbench reward``): ``answer`` as a number or ``#### N``."""
        return str(reference_number(str(row["answer"])))
