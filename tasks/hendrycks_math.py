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
from dataclasses import dataclass

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

    def validate(self):
        super().validate()
        if self.verify_timeout_s <= 0 or self.verify_workers < 1:
            raise ValueError("verify_timeout_s must be > 0 and verify_workers >= 1")


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

    def _records(self, split):
        rows = load_split(self.config, split, self.FILES, ("problem",))
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
