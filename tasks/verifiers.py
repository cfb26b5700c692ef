"""How an extracted answer is compared with the reference (``task.verifier`` of the ``dataset`` task).

Each verifier scores a batch: ``(predictions, references, rows) -> [score in [0, 1]]``; a
prediction of None (no answer could be read) scores 0.

  numeric      the last number of each side, compared exactly as rationals (``18.00`` = ``18``,
               ``18.5`` ≠ ``18``; ``1,234``, ``$5``, ``25%``, ``−3`` read as numbers): GSM8K's parser
  math         math-verify's symbolic equivalence (fractions, radicals, intervals, ``x = 3`` vs
               ``3``) in worker processes with a hard time limit: the MATH task's checker
  exact        equal after SQuAD's normalisation: case, punctuation, the articles a/an/the and
               runs of whitespace are ignored
  choice       the same option: letters compare as letters; a prediction written as an option's
               text (``choices`` names the row's options) counts as that option's letter
  regex        the reference is a regular expression the whole stripped prediction must match
  f1           SQuAD's token F1 between the normalised texts: partial credit in [0, 1]
  code_tests   the prediction is a Python program; the row's tests (``tests``) run against it in
               the sandbox (bubblewrap), 1 when every assertion passes: HumanEval's harness
  module:fn    your own: ``fn(prediction: str | None, reference: str, row: dict) -> float | bool``,
               imported from ``module`` (a file's directory must be on PYTHONPATH)

Not covered: verifiers that need the prompt or other completions of the group (a task plugin
sees both); partial credit from code tests (a program passes or fails as a whole).
"""
from __future__ import annotations

import importlib
import re
import string
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

from rlbench.tasks.answers import LETTERS, last_number, letter

BUILT_IN = ("numeric", "math", "exact", "choice", "regex", "f1", "code_tests")


@dataclass(frozen=True)
class VerifyOptions:
    """What a few verifiers need beyond the two answers (the dataset task's config fills it)."""

    choices: str = ""  # the row field holding the options, in letter order (choice)
    tests: str = ""  # a Jinja template of the row's test code (code_tests); rendered into row["__tests__"]
    math_timeout_s: float = 5.0
    math_workers: int = 2
    timeout_s: float = 10.0  # code_tests: per program
    memory_mb: int = 1024
    sandbox_workers: int = 4
    sandbox_level: str = "bwrap"


def number(text: str | None) -> Fraction | None:
    """The last number of ``text`` as an exact rational (``25%`` is 25), or None."""
    s = last_number(text) if text is not None else None
    if s is None:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of the normalised texts."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def option_letter(text: str, options: list | None) -> str | None:
    """The letter ``text`` names: a letter answer, else the letter of the option it equals."""
    if options:
        wanted = normalize(text)
        for i, option in enumerate(options[:len(LETTERS)]):
            if wanted and normalize(str(option)) == wanted:
                return LETTERS[i]
    return letter(text) if len(text.strip()) <= 40 else None


def _each(fn, predictions, references, rows):
    return [0.0 if p is None else float(fn(p, r, row)) for p, r, row in zip(predictions, references, rows)]


def _numeric(predictions, references, rows, opts):
    return _each(lambda p, r, _: number(p) is not None and number(p) == number(r), predictions, references, rows)


def _math(predictions, references, rows, opts):
    from rlbench.tasks.hendrycks_math import check_many

    results, _ = check_many(list(zip(references, predictions)), opts.math_timeout_s, opts.math_workers)
    return [float(x) for x in results]


def _exact(predictions, references, rows, opts):
    return _each(lambda p, r, _: normalize(p) == normalize(r), predictions, references, rows)


def _choice(predictions, references, rows, opts):
    def same(p, r, row):
        options = row.get(opts.choices) if opts.choices else None
        want = option_letter(r, options)
        return want is not None and option_letter(p, options) == want
    return _each(same, predictions, references, rows)


def _regex(predictions, references, rows, opts):
    return _each(lambda p, r, _: re.fullmatch(r, p.strip()) is not None, predictions, references, rows)


def _f1(predictions, references, rows, opts):
    return _each(lambda p, r, _: f1(p, r), predictions, references, rows)


def entry_point(tests: str) -> str | None:
    """The function the tests call: the first name called in an ``assert`` that is not a builtin
    or a method (``assert int(lobb_num(5, 3)) == 35`` calls ``lobb_num``; MBPP's form)."""
    import builtins

    called = [name for line in re.findall(r"^\s*assert\b(.*)$", tests, re.M)
              for name in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", line)
              if name not in ("not", "and", "or", "in", "is")]
    # a program may shadow a builtin (MBPP task 126 defines `sum`): then the first name called
    return next((n for n in called if not hasattr(builtins, n)), called[0] if called else None)


def code_verdict(program: str, tests: str, opts: VerifyOptions):
    """Run ``tests`` (top-level asserts calling one function) against ``program`` in the sandbox."""
    from rlbench.tasks import sandbox

    name = entry_point(tests)
    if name is None:
        return sandbox.Verdict(False, "the row's tests call no function (expected `assert name(...)`)", 0.0)
    body = "\n".join("    " + line for line in tests.splitlines()) or "    pass"
    # the harness's own name cannot collide with the program's (MBPP task 899 defines `check`)
    return sandbox.check_function(program, name, "def __rlbench_check(candidate):\n" + body + "\n",
                                  check_name="__rlbench_check", limits=sandbox.Limits(timeout_s=opts.timeout_s, memory_mb=opts.memory_mb),
                                  level=opts.sandbox_level)


def _code_tests(predictions, references, rows, opts):
    def one(args):
        p, row = args
        return 0.0 if p is None else float(code_verdict(p, row["__tests__"], opts).passed)
    with ThreadPoolExecutor(opts.sandbox_workers) as ex:
        return list(ex.map(one, zip(predictions, rows)))


_TABLE = {"numeric": _numeric, "math": _math, "exact": _exact, "choice": _choice, "regex": _regex, "f1": _f1,
          "code_tests": _code_tests}


def resolve(name: str):
    """The batch verifier called ``name``: a built-in, or ``module:function`` (imported now, so a
    typo fails at config time). Raises ValueError with the choices."""
    if name in _TABLE:
        fn = _TABLE[name]
        return lambda predictions, references, rows, opts: fn(predictions, references, rows, opts)
    if ":" not in name:
        import difflib

        near = difflib.get_close_matches(name, BUILT_IN, n=1)
        raise ValueError(f"verifier {name!r} is not one of {', '.join(BUILT_IN)} or module:function"
                         + (f" (did you mean {near[0]!r}?)" if near else ""))
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verifier {name!r}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ValueError(f"verifier {name!r} is not callable")

    def custom(predictions, references, rows, opts):
        out = []
        for p, r, row in zip(predictions, references, rows):
            v = float(fn(p, r, row))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"verifier {name!r} returned {v} (scores must lie in [0, 1])")
            out.append(v)
        return out
    return custom
