"""Event-hook plugin: the aha-moment detector (DeepSeek-R1's "wait, let me re-check").

After each step's rollouts it counts completions that contain a
self-verification phrase (``logging.aha_phrases``, case-insensitive, on word
boundaries), logs the share as ``aha/rate`` (and ``aha/rate_correct``: among
completions whose accuracy is 1), and appends up to ``logging.aha_examples``
snippets (80 characters around the phrase) per step to ``aha.jsonl`` in the
run directory. It only observes: rewards and training are untouched.

Not covered: phrases in other languages; whether a "wait" actually leads to a
correction (compare ``aha/rate_correct`` with the accuracy).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import rlbench


@lru_cache(maxsize=8)
def _pattern(phrases: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b", re.I)


def find(text: str, phrases: tuple[str, ...]) -> re.Match | None:
    return _pattern(phrases).search(text) if phrases else None


@rlbench.hookimpl
def rlbench_on_rollouts(step, rollouts, rewards, run_dir, config):
    phrases = tuple(config.logging.aha_phrases)
    if not phrases or rollouts.n == 0:
        return None
    hits = [find(t, phrases) for t in rollouts.texts]
    acc = rewards.get("accuracy")
    correct = [i for i in range(rollouts.n) if acc is not None and float(acc[i]) >= 1.0]
    out = {"aha/rate": sum(h is not None for h in hits) / rollouts.n}
    if correct:
        out["aha/rate_correct"] = sum(hits[i] is not None for i in correct) / len(correct)
    examples = [(i, h) for i, h in enumerate(hits) if h is not None][: config.logging.aha_examples]
    if examples:
        with open(Path(run_dir) / "aha.jsonl", "a") as f:
            for i, h in examples:
                t = rollouts.texts[i]
                f.write(json.dumps({"step": step, "phrase": h.group(0), "accuracy": float(acc[i]) if acc is not None else None,
                                    "snippet": t[max(0, h.start() - 40): h.end() + 40]}) + "\n")
    return out
