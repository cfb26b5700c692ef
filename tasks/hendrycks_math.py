"""Task ``math``: competition mathematics (Hendrycks et al. 2021); train 12,000, test MATH-500.

Data: tasks/data/math (MIT; MATH-500 as in PRM800K, and the 12k train split
built from the original MATH files; see tasks/data/README.md), or
``train_file`` / ``test_file`` (JSONL with ``problem`` and ``answer`` or a
``solution`` holding ``\\boxed{…}``), or a Hugging Face dataset
(``hf_dataset: HuggingFaceH4/MATH-500``).

Accuracy: the prediction is the content of the single ``<answer>`` block (its
last ``\\boxed{}`` when it has one), else the last ``\\boxed{}`` of the
completion; ``$`` and ``\\text{(B)}``-style wrappers are handled by math-verify
(https://github.com/huggingface/Math-Verify), which compares the two symbolically
(fractions, decimals, radicals, π, intervals, sets, ``x = 3`` vs ``3``, units
and ``^\\circ``). Identical strings are accepted without it.

Every math-verify check runs in a worker process (pebble, spawn) with a hard
time limit (``verify_timeout_s``): the worker is killed and the answer scored 0
when it is exceeded, from any thread, in any process. math-verify's own
signal-based timeouts are switched off, as they only work in the main thread
(elsewhere every answer would silently score 0). Timeouts are counted in
``timeouts``.

Distribution shift by subject and level: ``subjects`` / ``levels`` restrict training (and
``test``) to those subjects (MATH's seven: Algebra, Counting & Probability, Geometry,
Intermediate Algebra, Number Theory, Prealgebra, Precalculus) and levels (1–5); the held-out
problems outside them are the splits ``ood_subjects`` and ``ood_levels`` (``eval.splits``), e.g.
train on levels 1–3 and evaluate on 4–5. A custom file needs the fields ``subject`` (or ``type``)
and ``level`` for this.

Not covered: answers with no ``\\boxed{}`` and no answer tags (read as no
answer); repeating decimals (``0.\\overline{3}``) are not parsed by math-verify.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import rlbench
from rlbench.tasks.common import DATA, DatasetTask, PromptConfig, answer_block, chat_messages, chat_prompt, last_boxed, load_split
from rlbench.types import DataError, Prompt

log = logging.getLogger(__name__)


@rlbench.hookimpl
def rlbench_tasks():
    return {"math": "rlbench.tasks.hendrycks_math:MATH"}


@dataclass
class MATHConfig(PromptConfig):
    instruction: str = "Put the final answer inside <answer></answer> tags."
    verify_timeout_s: float = 5.0  # per answer, enforced by killing the worker process
    verify_workers: int = 2  # math-verify worker processes
    subjects: list = field(default_factory=list)  # train (and test) on these subjects only; the others: ood_subjects
    levels: list = field(default_factory=list)  # train (and test) on these levels (1-5) only; the others: ood_levels

    def validate(self):
        super().validate()
        if self.verify_timeout_s <= 0 or self.verify_workers < 1:
            raise ValueError("verify_timeout_s must be > 0 and verify_workers >= 1")
        bad = [x for x in self.subjects if x not in SUBJECTS]
        if bad:
            raise ValueError(f"unknown subject(s) {bad}; MATH's are {', '.join(SUBJECTS)}")
        if not all(isinstance(x, int) and 1 <= x <= 5 for x in self.levels):
            raise ValueError(f"levels must be integers 1-5, got {self.levels!r}")


SUBJECTS = ("Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra", "Number Theory", "Prealgebra",
            "Precalculus")


def subject_and_level(row: dict) -> tuple[str | None, int | None]:
    """A MATH row's subject (``subject``, or the original files' ``type``) and level (5 or "Level 5")."""
    level = row.get("level")
    if isinstance(level, str):
        level = int(level.split()[-1]) if level.split() and level.split()[-1].isdigit() else None
    return row.get("subject") or row.get("type"), level


def prediction(text: str) -> str | None:
    content, n = answer_block(text)
    if n:
        if content is None:
            return None  # several answers: no hedging
        inner = last_boxed(content)
        return (inner if inner is not None else content).strip().strip("$").strip() or None
    boxed = last_boxed(text)
    return boxed.strip() if boxed else None


def _normal(s: str) -> str:
    return "".join(s.split()).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")


def equivalent(gold: str, pred: str) -> bool:
    """math-verify equivalence of two answer strings (runs in a worker process)."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    return bool(g and p and verify(g, p, timeout_seconds=None))


class _Pool:
    """One pebble process pool per process, started on first use."""

    lock = threading.Lock()
    pool = None
    workers = 0
    registered = False

    @classmethod
    def get(cls, workers: int):
        import pebble

        with cls.lock:
            if cls.pool is None or cls.workers != workers or not cls.pool.active:
                if cls.pool is not None:
                    cls.pool.stop()
                cls.pool = pebble.ProcessPool(max_workers=workers, context=multiprocessing.get_context("spawn"))
                cls.workers = workers
                if not cls.registered:  # once per process, however often the pool is replaced
                    cls.registered = True
                    atexit.register(cls.close)
                    # a multiprocessing child skips atexit but runs these finalizers before joining its
                    # children: without it, a worker process that scored MATH answers would never exit
                    multiprocessing.util.Finalize(cls, cls.close, exitpriority=100)
            return cls.pool

    @classmethod
    def close(cls):
        with cls.lock:
            if cls.pool is not None:
                cls.pool.stop()
                cls.pool.join(timeout=5)
                cls.pool = None


def check_many(pairs: list[tuple[str, str | None]], timeout_s: float = 5.0, workers: int = 2) -> tuple[list[bool], int]:
    """Equivalence of (gold, prediction) pairs; a check over ``timeout_s`` is False. Returns results and timeouts."""
    results: list[bool | None] = []
    todo = []
    for i, (gold, pred) in enumerate(pairs):
        if pred is None:
            results.append(False)
        elif _normal(gold) == _normal(pred):
            results.append(True)
        else:
            results.append(None)
            todo.append(i)
    timeouts = 0
    if todo:
        pool = _Pool.get(workers)
        futures = {i: pool.schedule(equivalent, args=pairs[i], timeout=timeout_s) for i in todo}
        for i, f in futures.items():
            try:
                results[i] = bool(f.result())
            except FutureTimeout:
                results[i] = False
                timeouts += 1
            except Exception:  # noqa: BLE001 - unparsable answers and math-verify errors score 0
                results[i] = False
    return [bool(r) for r in results], timeouts


class MATH(DatasetTask):
    Config = MATHConfig
    FILES = {"train": DATA / "math" / "train.jsonl", "test": DATA / "math" / "test500.jsonl"}

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.timeouts = 0
        self.skipped: dict[str, int] = {}

    def splits(self) -> list[str]:
        """``test`` and, when training is restricted, the held-out problems outside it."""
        c = self.config
        return ["test"] + (["ood_subjects"] if c.subjects else []) + (["ood_levels"] if c.levels else [])

    def _in_distribution(self, row: dict, where: str) -> tuple[bool, bool] | None:
        """(subject in distribution, level in distribution) of a row; None for a row whose level is
        not a number ("Level ?": two of the 12,000), which no restricted split takes."""
        c = self.config
        if not (c.subjects or c.levels):
            return True, True
        if (c.subjects and not (row.get("subject") or row.get("type"))) or (c.levels and "level" not in row):
            raise DataError(f"math {where}: subjects/levels need each row's subject (or type) and level")
        subject, level = subject_and_level(row)
        if c.levels and level is None:
            return None
        return (not c.subjects or subject in c.subjects), (not c.levels or level in c.levels)

    def _records(self, split):
        rows = load_split(self.config, "train" if split == "train" else "test", self.FILES, ("problem",))
        keep = {"train": lambda s, lv: s and lv, "test": lambda s, lv: s and lv,
                "ood_subjects": lambda s, lv: not s and lv, "ood_levels": lambda s, lv: s and not lv}.get(split)
        if keep is None or split not in ["train"] + self.splits():
            raise DataError(f"math has splits {', '.join(['train'] + self.splits())}, not {split!r}")
        where = [self._in_distribution(r, f"{split} record {i}") for i, r in enumerate(rows)]
        rows = [r for r, w in zip(rows, where) if w is not None and keep(*w)]
        out, skipped = [], []
        for i, r in enumerate(rows):
            answer = r.get("answer") or (last_boxed(r.get("solution") or "") if r.get("solution") else None)
            if not answer or not str(answer).strip():
                skipped.append(i)  # e.g. one original MATH solution ends in an empty \boxed{}
                continue
            out.append((r.get("unique_id") or f"{split}/{i}", r["problem"], str(answer)))
        if skipped:
            self.skipped[split] = len(skipped)
            log.warning("math %s: %d record(s) without a reference answer skipped (first: record %d)",
                        split, len(skipped), skipped[0])
        if not out:
            raise DataError(f"math {split}: no record has an 'answer' or a \\boxed{{}} in its 'solution'")
        return out

    def _prompt(self, rec) -> Prompt:
        uid, problem, answer = rec
        user = problem + (f" {self.config.instruction}" if self.config.instruction else "")
        text, prefilled = chat_prompt(self.tok, self.config, user)
        return Prompt(id=f"math/{uid}", text=text, answer=answer, meta={"question": problem, "prefilled_think": prefilled, "messages": chat_messages(self.config, user)})

    def correct(self, prompts, texts):
        res, t = check_many([(p.answer, prediction(x)) for p, x in zip(prompts, texts)],
                            self.config.verify_timeout_s, self.config.verify_workers)
        self.timeouts += t
        return res

    @staticmethod
    def reference(row: dict):
        return str(row["answer"])
