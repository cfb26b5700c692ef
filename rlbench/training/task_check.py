"""``rlbench task check``: is this task what you think it is, before any model loads?

For any task: its splits' sizes, three prompts as the model sees them (through the chat
template), what the references look like (numbers, option letters or free text; how many
distinct values; the most common ones: a constant answer is a warning), and the overlap of the
train and test sets (identical prompts, and identical prompt + answer). For a task that can
write its reference as a completion (``gold(prompt) -> str | None``; the ``dataset`` task and
the built-in tasks do), the self-check scores every row's gold completion with the task's own
reward: a verifier that rejects its own gold answers ("Reward bugs are silent") shows here.

``rlbench run`` (and ``probe``, and a suite before its first run) calls ``preflight``: the same
check, refusing the run when the self-check rejects more than ``task.max_gold_rejects`` rows
(tasks without that option only warn). Procedural tasks with no fixed size are checked on 200
drawn problems per split; the run's check scores at most ``RUN_GOLD_LIMIT`` sandboxed programs
per split (``rlbench task check`` scores every row).

Not covered: whether the prompt is answerable (``rlbench probe`` measures the model on it).
"""
from __future__ import annotations

import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from rlbench import config as cfgmod
from rlbench import manager
from rlbench.types import Prompt

PROCEDURAL_N = 200  # problems drawn per split of a task with no fixed size
RUN_GOLD_LIMIT = 64  # sandboxed gold programs per split in the run's automatic check
_NUMBER = re.compile(r"^\s*[-\u2212]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?\s*$")
_LETTER = re.compile(r"^\s*\(?[A-J]\)?\s*$")


@dataclass
class Reject:
    id: str
    where: str  # file:line, or the prompt id
    reference: str
    score: float
    why: str = ""  # what the task read from the gold completion (the task's why(), when it has one)

    def __str__(self) -> str:
        return f"{self.where} reference {_short(self.reference)}" + (f" ({self.why})" if self.why else "")


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 5] + "…" + text[-4:]


@dataclass
class TaskCheck:
    task: str  # label (plugin)
    sizes: dict[str, int]
    examples: list[str]
    kinds: dict[str, int]  # numeric / choice / text -> count of references
    distinct: int
    common: list[tuple[str, int]]
    overlap_prompts: int
    overlap_pairs: int
    gold_checked: int = 0
    gold_accepted: int = 0
    rejects: list[Reject] = field(default_factory=list)
    gold_note: str = ""  # why the self-check was skipped or limited
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [f"task {self.task}: " + ", ".join(f"{k} {v} rows" for k, v in self.sizes.items())]
        lines.append(f"prompts ({len(self.examples)} of train, through the chat template):")
        for i, text in enumerate(self.examples, 1):
            shown = text if len(text) <= 600 else text[:300] + " […] " + text[-280:]
            lines.append(f"  [{i}] " + shown.replace("\n", "\n      "))
        total = sum(self.kinds.values())
        kinds = ", ".join(f"{k} {v}/{total}" for k, v in self.kinds.items() if v)
        common = ", ".join(f"{_short(a, 30)} {n} ({n / max(total, 1):.0%})" for a, n in self.common)
        lines.append(f"references: {kinds}; {self.distinct} distinct; most common: {common}")
        if self.gold_checked:
            lines.append(f"gold self-check: {self.gold_accepted}/{self.gold_checked} accepted "
                         f"({self.gold_accepted / self.gold_checked:.1%})" + (f"; {self.gold_note}" if self.gold_note else ""))
            for r in self.rejects[:5]:
                lines.append(f"  rejected: {r} score {r.score:g}")
            if len(self.rejects) > 5:
                lines.append(f"  … and {len(self.rejects) - 5} more")
        else:
            lines.append(f"gold self-check: skipped ({self.gold_note})")
        lines.append(f"overlap train/test: {self.overlap_prompts} identical prompts, "
                     f"{self.overlap_pairs} identical prompt+answer")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"checked in {self.seconds:.1f} s")
        return "\n".join(lines)


def _kind(answer: str) -> str:
    if _LETTER.match(answer):
        return "choice"
    return "numeric" if _NUMBER.match(answer) else "text"


def _all_prompts(task, split: str) -> list[Prompt]:
    if hasattr(task, "all_prompts"):  # in file order, so the rejects listed are the first ones
        return task.all_prompts(split)
    size = getattr(task, "size", None)
    n = size(split) if size else PROCEDURAL_N
    return task.prompts(split, n, seed=0)


def _question(p: Prompt) -> str:
    return str(p.meta.get("question", p.text))


def _gold(task, prompts: list[Prompt], limit: int | None) -> tuple[int, int, list[Reject], str]:
    gold = getattr(task, "gold", None)
    if gold is None:
        return 0, 0, [], "the task plugin has no gold(prompt) method"
    pairs = [(p, gold(p)) for p in prompts]
    pairs = [(p, g) for p, g in pairs if g is not None]
    if not pairs:
        return 0, 0, [], "the task cannot write its references as completions (verifier regex: set task.gold)"
    note = ""
    if limit is not None and len(pairs) > limit:
        note = f"{limit} of {len(pairs)} rows (the run's check; rlbench task check scores all)"
        pairs = pairs[:limit]
    scores = task.score([p for p, _ in pairs], [g for _, g in pairs])["accuracy"]
    where = getattr(task, "where", lambda p: p.id)
    rejects = [Reject(p.id, where(p), str(p.answer), s) for (p, _), s in zip(pairs, scores) if s < 1.0]
    why = getattr(task, "why", None)
    golds = {p.id: g for p, g in pairs}
    for r in rejects[:5] if why else []:  # the first ones shown: say what the task read
        r.why = why(next(p for p, _ in pairs if p.id == r.id), golds[r.id])
    return len(pairs), len(pairs) - len(rejects), rejects, note


def check(cfg: cfgmod.Config, tokenizer=None, *, sandbox_limit: int | None = None) -> TaskCheck:
    """Load the task of ``cfg`` and check it (module docstring). ``sandbox_limit`` caps the gold
    programs per split a code verifier runs."""
    from rlbench.modeling import models

    t0 = time.perf_counter()
    tok = tokenizer or models.load_tokenizer(cfg.model.name)
    task = manager.get("task", cfg.names["task"])(cfg.task, tok)
    splits = {s: _all_prompts(task, s) for s in ("train", "test")}
    every = splits["train"] + splits["test"]
    answers = [str(p.answer) for p in every]
    counts = Counter(answers)
    warnings = []
    if len(counts) == 1:
        warnings.append(f"every reference is {answers[0]!r}: a model that always answers it scores 100%")
    elif counts.most_common(1)[0][1] > 0.5 * len(answers):
        a, n = counts.most_common(1)[0]
        warnings.append(f"{n / len(answers):.0%} of the references are {a!r}: answering it always scores that much")
    expensive = getattr(cfg.task, "verifier", "") == "code_tests" or cfg.names["task"] == "humaneval"
    limit = sandbox_limit if expensive else None
    checked = accepted = 0
    rejects: list[Reject] = []
    notes = []
    for split, prompts in splits.items():
        c, a, r, note = _gold(task, prompts, limit)
        checked, accepted, rejects = checked + c, accepted + a, rejects + r
        if note and note not in notes:
            notes.append(note)
    train_q = {_question(p) for p in splits["train"]}
    train_qa = {(_question(p), str(p.answer)) for p in splits["train"]}
    sizes = {s: (task.size(s) if hasattr(task, "size") else len(ps)) for s, ps in splits.items()}
    if not hasattr(task, "size"):
        notes.append(f"a procedural task: {PROCEDURAL_N} drawn problems per split")
    return TaskCheck(
        task=cfg.label("task") + (f" ({cfg.names['task']})" if cfg.labels.get("task") else ""), sizes=sizes,
        examples=[p.text for p in splits["train"][:3]], kinds=dict(Counter(_kind(a) for a in answers)),
        distinct=len(counts), common=counts.most_common(5),
        overlap_prompts=sum(_question(p) in train_q for p in splits["test"]),
        overlap_pairs=sum((_question(p), str(p.answer)) in train_qa for p in splits["test"]),
        gold_checked=checked, gold_accepted=accepted, rejects=rejects, gold_note="; ".join(notes),
        warnings=warnings, seconds=time.perf_counter() - t0)


def refusal(cfg: cfgmod.Config, result: TaskCheck) -> str | None:
    """Why a run must not start on this task, or None."""
    allowed = getattr(cfg.task, "max_gold_rejects", None)
    if allowed is None or len(result.rejects) <= allowed:
        return None
    first = "; ".join(str(r) for r in result.rejects[:5])
    return (f"task {result.task}: the verifier rejects {len(result.rejects)} of {result.gold_checked} gold answers "
            f"(task.max_gold_rejects is {allowed}); first: {first}. The reward would train toward wrong answers: "
            f"fix task.answer / extract / verifier (rlbench task check shows the table)")


def preflight(cfg: cfgmod.Config, tokenizer=None, echo=True) -> TaskCheck:
    """The check ``rlbench run`` does first: prints a one-line summary (the table on refusal) and
    raises ConfigError when the gold self-check fails."""
    result = check(cfg, tokenizer, sandbox_limit=RUN_GOLD_LIMIT)
    reason = refusal(cfg, result)
    if reason:
        print(result.format(), file=sys.stderr)
        raise cfgmod.ConfigError(reason)
    if echo:
        gold = (f"gold {result.gold_accepted}/{result.gold_checked} accepted" if result.gold_checked
                else "no gold self-check")
        print(f"rlbench: task check: {result.task}: " + ", ".join(f"{k} {v}" for k, v in result.sizes.items())
              + f"; {gold}; {result.overlap_prompts} test prompts also in train; {result.seconds:.1f} s", file=sys.stderr)
        for w in result.warnings + [f"{len(result.rejects)} gold answer(s) rejected: rlbench task check lists them"
                                    for _ in result.rejects[:1]]:
            print(f"rlbench: task check: warning: {w}", file=sys.stderr)
    return result
