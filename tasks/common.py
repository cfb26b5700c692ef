"""What the dataset tasks (gsm8k, math, humaneval) share: data loading, prompts, answer
extraction, the format and overlong rewards, seeded splits.

Format reward (≤ 0.1, so formatting never pays more than being right). The R1
shape is ``<think>…</think><answer>…</answer>``; for a base-model prompt that
already ends in ``<think>`` the completion starts inside the think block.

  strict  ``format_reward``: one think block, then exactly one answer block,
          nothing but whitespace before, between and after, no tag inside
          another block.
  partial ``partial_format_reward``: exactly one well-formed answer block, but
          the strict shape fails (no think block, text after ``</answer>``, …).
  0       no answer block, an unclosed one, several (hedging) or nested ones.
          Look-alike brackets (``＜answer＞``, ``‹answer›``, ``〈answer〉``) are not
          tags: they earn nothing and are not read as the answer.

Overlong penalty (optional, ``overlong_threshold`` > 0 tokens): −``overlong_penalty``
× min(1, (tokens − threshold) / ``overlong_ramp``), its own reward component.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rlbench.types import DataError

DATA = Path(__file__).resolve().parent / "data"

R1_SYSTEM = ("You are a helpful assistant. First think about the problem inside <think> </think> tags, "
             "then give the final answer inside <answer> </answer> tags.")

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)
_TAG = re.compile(r"</?(?:think|answer)>")
_STRICT = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.S)


@dataclass
class PromptConfig:
    """Prompt and format-reward options shared by the dataset tasks."""

    system_prompt: str = R1_SYSTEM  # empty string: no system message
    chat_template: bool = True  # False: a plain-text prompt for base models (ends in "<think>")
    format_reward: float = 0.1  # strict R1 shape
    partial_format_reward: float = 0.05  # one clean answer block, shape not strict
    overlong_threshold: int = 0  # tokens; > 0 turns on the overlong penalty
    overlong_penalty: float = 0.1
    overlong_ramp: int = 64  # tokens over the threshold at which the full penalty applies
    train_file: str = ""  # a local JSONL instead of the vendored train split
    test_file: str = ""  # a local JSONL instead of the vendored test split
    hf_dataset: str = ""  # a Hugging Face dataset name or local dataset directory (datasets.load_dataset)
    hf_config: str = ""  # its configuration name (e.g. "main" for openai/gsm8k)

    def validate(self):
        if not 0.0 <= self.partial_format_reward <= self.format_reward <= 0.1:
            raise ValueError("need 0 <= partial_format_reward <= format_reward <= 0.1 (format must not outweigh accuracy)")
        if self.overlong_threshold < 0 or self.overlong_penalty < 0 or self.overlong_ramp < 1:
            raise ValueError("overlong_threshold and overlong_penalty must be >= 0, overlong_ramp >= 1")
        for key in ("train_file", "test_file"):
            f = getattr(self, key)
            if f and not Path(f).is_file():
                raise ValueError(f"{key}: data file not found: {f}")


# -- data ---------------------------------------------------------------------------------

def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Records of a JSONL file; a line that is not JSON or lacks a field is a DataError naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {no}: not valid JSON ({e.msg})") from None
            _check_row(row, required, f"{path} line {no}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _check_row(row, required, where):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    missing = [k for k in required if k not in row or row[k] is None]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)} (has {', '.join(sorted(row)) or 'nothing'})")


def load_split(cfg: PromptConfig, split: str, vendored: dict[str, Path], required: tuple[str, ...],
               hf_splits: dict[str, str] | None = None) -> list[dict]:
    """The records of ``split``: a local file from the config, else a Hugging Face dataset, else vendored data."""
    local = {"train": cfg.train_file, "test": cfg.test_file}.get(split)
    if local:
        return read_jsonl(local, required)
    if cfg.hf_dataset:
        import datasets

        name = (hf_splits or {}).get(split, split)
        try:
            ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config or None, split=name)
        except Exception as e:  # noqa: BLE001 - hub, network and format errors all end here
            raise DataError(f"hf_dataset {cfg.hf_dataset!r} split {name!r}: {type(e).__name__}: {e}") from None
        rows = []
        for i, row in enumerate(ds):
            _check_row(row, required, f"{cfg.hf_dataset} {name} row {i}")
            rows.append(dict(row))
        return rows
    if split not in vendored:
        raise DataError(f"no {split!r} split; available: {', '.join(vendored)}")
    return read_jsonl(vendored[split], required)


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: hash-based splits that never depend on a seed."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def sample(items: list, split: str, n: int, seed: int) -> list:
    """``test`` and every other held-out split: the first n of a fixed shuffle (the same held-out
    set for every run); ``train``: n drawn with the run's seed, without replacement while the split lasts."""
    if split != "train":
        order = list(range(len(items)))
        random.Random(12345).shuffle(order)
        return [items[i] for i in order[:n]]
    rng = random.Random(seed)
    if n <= len(items):
        return rng.sample(items, n)
    return [items[rng.randrange(len(items))] for _ in range(n)]


def chat_messages(cfg: PromptConfig, user: str) -> list[dict] | None:
    """The chat a prompt renders (``Prompt.meta["messages"]``: a multi-turn environment continues it);
    None for a plain-text prompt (``chat_template: false``)."""
    if not cfg.chat_template:
        return None
    return ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [{"role": "user", "content": user}]


def chat_prompt(tok, cfg: PromptConfig, user: str, base_text: str | None = None) -> tuple[str, bool]:
    """(prompt text, prefilled_think). ``base_text`` overrides the plain-text variant."""
    if cfg.chat_template:
        return tok.apply_chat_template(chat_messages(cfg, user), tokenize=False, add_generation_prompt=True), False
    if base_text is not None:
        return base_text, False
    return (cfg.system_prompt + "\n\n" if cfg.system_prompt else "") + f"Question: {user}\nAnswer: <think>", True


# -- answers and format -----------------------------------------------------------------------

def answer_block(text: str) -> tuple[str | None, int]:
    """The content of the single ``<answer>…</answer>`` block, and how many there are
    (content None when there are several, or when one is nested in another)."""
    blocks = _ANSWER_BLOCK.findall(text)
    if len(blocks) != 1 or "<answer>" in blocks[0]:
        return None, len(blocks)
    return blocks[0], 1


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{…}`` (or ``\fbox{…}``), braces balanced;
    ``\boxed 2`` (no braces) gives the token after the space."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest[:1] != "{":
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    depth = 0
    for j, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:j]
    return None


def format_score(text: str, cfg: PromptConfig, prefilled_think: bool = False) -> float:
    full = ("<think>" + text) if prefilled_think else text
    content, n = answer_block(full)
    if content is None:
        return 0.0
    m = _STRICT.match(full)
    if m and not _TAG.search(m.group("think")) and not _TAG.search(m.group("answer")) and full.count("<think>") == 1:
        return cfg.format_reward
    return cfg.partial_format_reward


def overlong(n_tokens: int, cfg: PromptConfig) -> float:
    if cfg.overlong_threshold <= 0 or n_tokens <= cfg.overlong_threshold:
        return 0.0
    return -cfg.overlong_penalty * min(1.0, (n_tokens - cfg.overlong_threshold) / cfg.overlong_ramp)


class DatasetTask:
    """Common scoring: ``accuracy`` from the subclass's ``correct``, then ``format`` and,
    when on, ``overlong``. Subclasses implement ``_records(split)``, ``_prompt(record)`` and
    ``correct(prompts, texts) -> list[float]``."""

    config: PromptConfig

    def __init__(self, config, tokenizer):
        self.config = config
        self.tok = tokenizer
        self._cache: dict[str, list] = {}

    def records(self, split: str) -> list:
        if split not in self._cache:
            self._cache[split] = self._records(split)
        return self._cache[split]

    def prompts(self, split: str, n: int, seed: int):
        return [self._prompt(r) for r in sample(self.records(split), split, n, seed)]

    def size(self, split: str) -> int:
        return len(self.records(split))

    def gold(self, prompt) -> str | None:
        """The reference written as a completion this task accepts (``rlbench task check``)."""
        return f"<think>The reference answer.</think>\n<answer>{prompt.answer}</answer>"

    def score(self, prompts, texts) -> dict[str, list[float]]:
        return components(self.config, self.tok, prompts, texts, self.correct(prompts, texts))


def components(cfg: PromptConfig, tok, prompts, texts, accuracy) -> dict[str, list[float]]:
    """A prompt-config task's reward components: ``accuracy`` as given, ``format`` and, when on,
    ``overlong`` (the module docstring): what every task built on PromptConfig reports."""
    out = {"accuracy": [float(x) for x in accuracy],
           "format": [format_score(t, cfg, p.meta.get("prefilled_think", False)) for p, t in zip(prompts, texts)]}
    if cfg.overlong_threshold > 0:
        out["overlong"] = [overlong(len(tok(t, add_special_tokens=False)["input_ids"]), cfg) for t in texts]
    return out
