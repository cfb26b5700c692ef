"""How a completion's final answer is read (``task.extract`` of the ``dataset`` task).

Every mode but ``regex`` first narrows the completion to its *answer text*: the content of the
single ``<answer>…</answer>`` block when there is one; several blocks (hedging) or a nested one
read as no answer (None). Look-alike brackets (``＜answer＞``) are not tags.

  tags               the answer block; no block: None
  tags_or_last_line  the answer block; no block: the last non-empty line of the completion
  last_number        the last number of the answer text (the whole completion without a block),
                     written plainly: ``1,234`` → ``1234``, ``$18.00`` → ``18.00``, ``−3`` → ``-3``
  boxed              the last ``\\boxed{…}`` of the answer text, else the answer block itself
  choice             a letter A–J standing alone in the answer text (``B``, ``(B)``, ``B.``,
                     ``Answer: B``, "the answer is B"; the last one), else the answer text
                     itself, so that ``verifier: choice`` can match an option's text
  code               the fenced code block of the answer text (```` ```python ````), the one that
                     defines a function when there are several, else the answer text
  regex: PATTERN     the first group (the whole match without groups) of PATTERN's last match
                     in the completion; no match: None

Not covered: answers written in words ("five"); a letter answer inside a sentence that names
two letters ("B, not C" reads as C).
"""
from __future__ import annotations

import re

from rlbench.tasks.common import answer_block, last_boxed

MODES = ("tags", "tags_or_last_line", "last_number", "boxed", "choice", "code", "regex: PATTERN")
LETTERS = "ABCDEFGHIJ"

_NUM = re.compile(r"(?<![\w.])-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_LETTER = re.compile(r"(?<![\w'])\(?([A-J])\)?(?![\w'])")
_ANSWER_IS = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?([A-J])\)?(?![\w'])", re.I)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def check_mode(mode: str) -> str | None:
    """None when ``mode`` is valid, else the reason (a bad regular expression, an unknown mode)."""
    if mode.startswith("regex:"):
        try:
            re.compile(mode[len("regex:"):].strip())
        except re.error as e:
            return f"extract {mode!r}: not a regular expression ({e})"
        return None
    if mode not in MODES:
        return f"extract must be one of {', '.join(MODES)}, got {mode!r}"
    return None


def answer_text(text: str, fallback: str = "all") -> str | None:
    """The single answer block's content; with no block the whole text (``fallback="all"``),
    its last non-empty line (``"last_line"``) or None (``"none"``); None when hedging."""
    content, n = answer_block(text)
    if n:
        return content
    if fallback == "none":
        return None
    if fallback == "last_line":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else None
    return text


def last_number(text: str) -> str | None:
    """The last number in ``text`` written plainly (no separators, currency or Unicode minus)."""
    found = _NUM.findall(text.replace("\u2212", "-").replace("\u2013", "-"))
    return found[-1].replace("$", "").replace(",", "").replace(" ", "") if found else None


def letter(text: str) -> str | None:
    """The option letter a text answers with: after "answer is"/"answer:" when it says so, else the
    last letter A–J standing alone; None when there is none."""
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].upper()
    alone = _LETTER.findall(text.strip())
    # a capital "A" or "I" inside a sentence is a word, not an option: only a short text counts them
    if alone and (len(text.split()) <= 3 or alone[-1] not in "AI"):
        return alone[-1]
    return None


def code_block(text: str) -> str:
    """The fenced code block that defines a function (else the first one), else ``text``."""
    fences = _FENCE.findall(text)
    if not fences:
        return text
    return next((f for f in fences if re.search(r"^\s*(?:async\s+)?def\s+\w+\s*\(", f, re.M)), fences[0])


def extract(text: str, mode: str) -> str | None:
    """The final answer of a completion under ``mode`` (module docstring), or None."""
    if mode.startswith("regex:"):
        matches = list(re.finditer(mode[len("regex:"):].strip(), text))
        if not matches:
            return None
        m = matches[-1]
        return m.group(1) if m.re.groups else m.group(0)
    if mode == "tags":
        return answer_text(text, "none")
    if mode == "tags_or_last_line":
        return answer_text(text, "last_line")
    body = answer_text(text)
    if body is None:
        return None
    if mode == "last_number":
        return last_number(body)
    if mode == "boxed":
        inner = last_boxed(body)
        if inner is not None:
            return inner.strip()
        content, n = answer_block(text)
        return content.strip().strip("$").strip() if n == 1 and content is not None else None
    if mode == "choice":
        return letter(body) or body.strip()
    if mode == "code":
        return code_block(body)
    raise ValueError(check_mode(mode) or mode)


def gold_completion(reference: str, mode: str) -> str:
    """The reference written as a completion ``mode`` reads (the self-check of ``rlbench task check``)."""
    if mode == "boxed":
        inner = "\\boxed{" + reference + "}"
    elif mode == "code":
        inner = "```python\n" + reference.rstrip() + "\n```"
    else:
        inner = reference
    return f"<think>The reference answer.</think>\n<answer>{inner}</answer>"
