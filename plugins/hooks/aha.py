"""Event-hook plugin: the aha-moment detector (DeepSeek-R1's "wait, let me re-check").

After each step's rollouts it counts completions that contain a
self-verification phrase (``hooks.aha.phrases``, case-insensitive, on word
boundaries), logs the share as ``aha/rate`` (and ``aha/rate_correct``: among
completions whose accuracy is 1), and appends up to ``hooks.aha.examples``
snippets (80 characters around the phrase) per step to ``aha.jsonl`` in the
run directory. It only observes: rewards and training are untouched. Its options
are its own (``AhaConfig``, the config's ``hooks.aha`` section; they were
``logging.aha_phrases`` / ``logging.aha_examples`` before 2026-12-07).

Not covered: phrases in other languages; whether a "wait" actually leads to a
correction (compare ``aha/rate_correct`` with the accuracy).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import rlbench


@dataclass(frozen=True)
class AhaConfig:
    # self-verification phrases, matched case-insensitively on word boundaries ([] turns it off)
    phrases: list = field(default_factory=lambda: [
        "wait", "let me check", "let me verify", "let me re-check", "let me recheck", "let me reconsider",
        "i made an error", "i made a mistake", "that's not right", "that is not right", "on second thought"])
    examples: int = 2  # example snippets saved per step

    def validate(self):
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0, got {self.examples}")


@rlbench.hookimpl
def rlbench_hook_options():
    return {"aha": AhaConfig}


@lru_cache(maxsize=8)
def _pattern(phrases: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b", re.I)


def find(text: str, phrases: tuple[str, ...]) -> re.Match | None:
    return _pattern(phrases).search(text) if phrases else None


@rlbench.hookimpl
def rlbench_on_rollouts(step, rollouts, rewards, run_dir, config):
    options = config.hooks["aha"]
    phrases = tuple(options.phrases)
    if not phrases or rollouts.n == 0:
        return None
    # multi-turn trajectories: every assistant turn is read, not only the final answer
    texts = ["\n".join(r.get("texts", [])) for r in rollouts.turns] if rollouts.turns else list(rollouts.texts)
    hits = [find(t, phrases) for t in texts]
    acc = rewards.get("accuracy")
    correct = [i for i in range(rollouts.n) if acc is not None and float(acc[i]) >= 1.0]
    out = {"aha/rate": sum(h is not None for h in hits) / rollouts.n}
    if correct:
        out["aha/rate_correct"] = sum(hits[i] is not None for i in correct) / len(correct)
    examples = [(i, h) for i, h in enumerate(hits) if h is not None][: options.examples]
    if examples:
        with open(Path(run_dir) / "aha.jsonl", "a") as f:
            for i, h in examples:
                t = texts[i]
                f.write(json.dumps({"step": step, "phrase": h.group(0), "accuracy": float(acc[i]) if acc is not None else None,
                                    "snippet": t[max(0, h.start() - 40): h.end() + 40]}) + "\n")
    return out
