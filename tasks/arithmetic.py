"""Task ``arithmetic``: synthetic integer arithmetic with a verifiable answer.

Problems like ``What is 7 + 5?`` with configurable difficulty (operand digits,
number of operands, operations). The problem space is split into disjoint
train / test parts by a hash of the problem text, so no held-out problem is
ever trained on, whatever the seed.

Rewards (each logged separately, their sum is the reward):
  accuracy  1.0 when the extracted answer equals the result. ``answer_mode``:
            ``tags`` reads only ``<answer>…</answer>``; ``tags_or_last_number``
            reads the tags when present, else the last number in the text (a
            weak model that never uses tags still gives a signal). Several
            answer blocks score 0 (no hedging).
  format    ``format_reward`` (≤ 0.1) for the strict shape
            ``<think>…</think> <answer>N</answer>`` with exactly one answer;
            ``partial_format_reward`` when there is exactly one answer block but
            the whole shape is not strict. Capped well below accuracy so a model
            cannot earn more by formatting than by being right (R1's format hack).

Held-out splits (``splits()``; ``eval.splits`` evaluates them beside ``test``): ``test`` is the
held-out part of the training distribution; the out-of-distribution ones, each disjoint from
training and from each other by construction (and each a fixed set, whatever the run seed):
  ood_larger_operands  the same operations with operands in [base, 2·base), outside the
                       training range (base = max_operand + 1, or 10^digits)
  ood_more_operands    one more operand than training, each in the training range
  ood_reworded         the ``test`` problems asked with other wordings ("Calculate 7 + 5.", …)

Not covered: division, parentheses, word problems (see the gsm8k task).
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

import rlbench
from rlbench.types import Prompt

R1_SYSTEM = ("You are a helpful assistant. First think about the problem inside <think> </think> tags, "
             "then give the final answer inside <answer> </answer> tags.")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_STRICT = re.compile(r"^\s*<think>(?:(?!<answer>|</?think>).)*</think>\s*<answer>\s*-?\d+\s*</answer>\s*$", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*")
# ood_reworded: the question without "What is …?" (each test problem gets one, by its index)
REWORDINGS = ("Calculate {expr}.", "Compute the value of {expr}.", "{expr} equals what number?",
              "Work out {expr} and report the result.")
SPLITS = ("test", "ood_larger_operands", "ood_more_operands", "ood_reworded")


@rlbench.hookimpl
def rlbench_tasks():
    return {"arithmetic": "rlbench.tasks.arithmetic:Arithmetic"}


@dataclass
class ArithmeticConfig:
    digits: int = 1  # max digits of each operand (1: 0-9, 2: 0-99)
    max_operand: int = 0  # > 0: operands range over 0..max_operand instead (finer difficulty than digits)
    operands: int = 2
    operations: list = field(default_factory=lambda: ["+"])  # any of + - *
    test_fraction: float = 0.3  # share of the problem space held out for evaluation
    answer_mode: str = "tags_or_last_number"  # tags | tags_or_last_number
    system_prompt: str = R1_SYSTEM  # empty string: no system message
    # appended to the question; measured on SmolLM2-135M: tag use 0% -> ~10% with it in the user turn
    instruction: str = "Put the final number inside <answer></answer> tags."
    chat_template: bool = True  # False: a plain-text prompt for base models
    format_reward: float = 0.1
    partial_format_reward: float = 0.05

    def validate(self):
        if not 1 <= self.digits <= 9:
            raise ValueError("digits must be between 1 and 9")
        if self.max_operand < 0:
            raise ValueError("max_operand must be >= 0 (0 = use digits)")
        if self.operands < 2:
            raise ValueError("operands must be >= 2")
        bad = [o for o in self.operations if o not in ("+", "-", "*")]
        if bad or not self.operations:
            raise ValueError(f"operations must be a non-empty list of '+', '-', '*'; got {self.operations}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError("test_fraction must be in (0, 1)")
        if self.answer_mode not in ("tags", "tags_or_last_number"):
            raise ValueError("answer_mode must be 'tags' or 'tags_or_last_number'")
        if not 0.0 <= self.partial_format_reward <= self.format_reward <= 0.1:
            raise ValueError("need 0 <= partial_format_reward <= format_reward <= 0.1 (format must not outweigh accuracy)")


def extract_answer(text: str, mode: str) -> int | None:
    tags = _ANSWER.findall(text)
    if len(tags) > 1:
        return None  # hedging with several answers earns nothing
    if tags:
        nums = _NUMBER.findall(tags[-1])
        return int(nums[-1].replace(",", "")) if len(nums) == 1 else None
    if mode == "tags":
        return None
    nums = _NUMBER.findall(text)
    return int(nums[-1].replace(",", "")) if nums else None


class Arithmetic:
    Config = ArithmeticConfig

    def __init__(self, config: ArithmeticConfig, tokenizer):
        self.config = config
        self.tok = tokenizer
        self.base = config.max_operand + 1 if config.max_operand > 0 else 10 ** config.digits
        self.space = self.base ** config.operands * len(config.operations)

    # -- problems --------------------------------------------------------
    def _problem(self, index: int, low: int = 0, operands: int | None = None) -> tuple[str, int]:
        """Problem ``index`` of a space of operations × operands, each operand in [low, low + base)."""
        c = self.config
        base = self.base
        op = c.operations[index % len(c.operations)]
        index //= len(c.operations)
        nums = []
        for _ in range(operands or c.operands):
            nums.append(low + index % base)
            index //= base
        expr = f" {op} ".join(map(str, nums))
        return expr, int(eval(expr))  # noqa: S307 - expr is built here from digits and + - *

    def _split_of(self, expr: str) -> str:
        h = int.from_bytes(hashlib.sha256(expr.encode()).digest()[:8], "big") / 2**64
        return "test" if h < self.config.test_fraction else "train"

    def _make(self, expr: str, result: int, question: str = "What is {expr}?") -> Prompt:
        c = self.config
        question = question.format(expr=expr) + (f" {c.instruction}" if c.instruction else "")
        msgs = None
        if c.chat_template:
            msgs = ([{"role": "system", "content": c.system_prompt}] if c.system_prompt else [])
            msgs.append({"role": "user", "content": question})
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = (c.system_prompt + "\n\n" if c.system_prompt else "") + f"Question: {question}\nAnswer: <think>"
        return Prompt(id=expr, text=text, answer=result, meta={"question": question, "messages": msgs})

    def splits(self) -> list[str]:
        """The held-out splits ``prompts`` serves (``eval.splits``): ``test`` and the ``ood_`` ones."""
        return list(SPLITS)

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]:
        """``train``: n problems drawn with replacement from the train part (seeded);
        ``test``: the first n problems of a fixed shuffle of the test part; the ``ood_`` splits
        (module docstring): the first n of a fixed draw, never depending on the run seed."""
        if split not in ("train",) + SPLITS:
            raise ValueError(f"unknown split {split!r}; arithmetic has 'train', " + ", ".join(map(repr, SPLITS)))
        if split == "ood_reworded":
            return [self._make(p.id, p.answer, REWORDINGS[i % len(REWORDINGS)])
                    for i, p in enumerate(self.prompts("test", n, seed))]
        if split in ("ood_larger_operands", "ood_more_operands"):
            larger = split == "ood_larger_operands"
            operands = self.config.operands + (0 if larger else 1)
            space = self.base ** operands * len(self.config.operations)
            rng, seen, out = random.Random(54321), set(), []
            while len(out) < min(n, space):
                expr, res = self._problem(rng.randrange(space), low=self.base if larger else 0, operands=operands)
                if expr not in seen:
                    seen.add(expr)
                    out.append(self._make(expr, res))
            return out
        if split == "test":
            rng = random.Random(12345)  # the eval set never depends on the run seed
            if self.space <= 200_000:
                items = [self._problem(i) for i in range(self.space)]
                items = [it for it in items if self._split_of(it[0]) == "test"]
                rng.shuffle(items)
                return [self._make(*it) for it in items[:n]]
            seen, out = set(), []
            while len(out) < n:
                expr, res = self._problem(rng.randrange(self.space))
                if expr not in seen and self._split_of(expr) == "test":
                    seen.add(expr)
                    out.append(self._make(expr, res))
            return out
        rng = random.Random(seed)
        out = []
        while len(out) < n:
            expr, res = self._problem(rng.randrange(self.space))
            if self._split_of(expr) == "train":
                out.append(self._make(expr, res))
        return out

    def gold(self, prompt: Prompt) -> str:
        """The reference written as a completion, a short worked solution in the answer format
        (``rlbench task check``'s self-check; sft's demonstration)."""
        return f"<think>{prompt.id} = {prompt.answer}</think>\n<answer>{prompt.answer}</answer>"

    # -- rewards ---------------------------------------------------------
    def score(self, prompts: list[Prompt], texts: list[str]) -> dict[str, list[float]]:
        c = self.config
        acc, fmt = [], []
        for p, t in zip(prompts, texts):
            ans = extract_answer(t, c.answer_mode)
            acc.append(1.0 if ans is not None and ans == p.answer else 0.0)
            n_answers = len(_ANSWER.findall(t))
            if _STRICT.match(t):
                fmt.append(c.format_reward)
            elif n_answers == 1:
                fmt.append(c.partial_format_reward)
            else:
                fmt.append(0.0)
        return {"accuracy": acc, "format": fmt}
