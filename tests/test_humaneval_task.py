"""HumanEval: code extraction from chat and base completions, verdicts in the sandbox, splits."""
import json
import os

import pytest

from rlbench.tasks import sandbox
from rlbench.tasks.humaneval import HumanEval, HumanEvalConfig, program_from
from rlbench.types import DataError

# CI sets RLBENCH_REQUIRE_SANDBOX=1: there a missing bubblewrap fails these tests instead of skipping them
pytestmark = pytest.mark.skipif(sandbox.probe()["level"] != "bwrap" and not os.environ.get("RLBENCH_REQUIRE_SANDBOX"),
                                reason="bubblewrap isolation not available")

ADD = "def add(x: int, y: int):\n    return x + y\n"
SUM_PRODUCT = ("def sum_product(numbers):\n    s, p = 0, 1\n    for n in numbers:\n        s += n\n        p *= n\n"
               "    return s, p\n")
CLOSE = ("def has_close_elements(numbers, threshold):\n    for i, a in enumerate(numbers):\n"
         "        for j, b in enumerate(numbers):\n            if i != j and abs(a - b) < threshold:\n"
         "                return True\n    return False\n")
CLOSE_BODY = CLOSE.split("\n", 1)[1]
TRUNC_BODY = "    return number % 1.0\n"
FIND_ZERO = ("def find_zero(xs: list):\n    lo, hi = -1.0, 1.0\n    while poly(xs, lo) * poly(xs, hi) > 0:\n"
             "        lo *= 2.0\n        hi *= 2.0\n    while hi - lo > 1e-10:\n        mid = (lo + hi) / 2.0\n"
             "        if poly(xs, mid) * poly(xs, lo) > 0:\n            lo = mid\n        else:\n            hi = mid\n"
             "    return lo\n")
SORT_THIRD = ("def sort_third(l: list):\n    l = list(l)\n    l[::3] = sorted(l[::3])\n    return l\n")


def fence(code, lang="python"):
    return f"```{lang}\n{code}```"


CASES = [  # (task_id, completion, passes)
    # chat form: a fenced whole function, with or without tags and prose
    ("HumanEval/53", f"<think>easy</think><answer>{fence(ADD)}</answer>", True),
    ("HumanEval/53", fence(ADD), True),
    ("HumanEval/53", "Here is the function:\n" + fence(ADD) + "\nIt adds the two numbers.", True),
    ("HumanEval/53", fence(ADD, "py"), True),
    ("HumanEval/53", fence(ADD, "Python3"), True),
    ("HumanEval/53", "```\n" + ADD + "```", True),  # no language tag
    ("HumanEval/53", "```python\n" + ADD, True),  # unclosed fence (budget ran out after the function)
    ("HumanEval/53", fence("print(add(2, 3))\n") + "\n" + fence(ADD), True),  # the block that defines it
    ("HumanEval/53", fence("def helper(a, b):\n    return a + b\n\n" + ADD.replace("x + y", "helper(x, y)")), True),
    ("HumanEval/53", fence("import operator\n\n" + ADD.replace("x + y", "operator.add(x, y)")), True),
    ("HumanEval/53", ADD, True),  # a whole function without a fence
    ("HumanEval/8", fence(SUM_PRODUCT), True),
    ("HumanEval/0", fence(CLOSE), True),
    ("HumanEval/32", fence(FIND_ZERO), True),  # uses poly() from the problem's prompt
    ("HumanEval/33", fence(SORT_THIRD), True),  # its tests also call sort_third by name
    # base form: a body continuation, cut at the HumanEval stop sequences
    ("HumanEval/2", TRUNC_BODY, True),
    ("HumanEval/2", TRUNC_BODY + "\n\ndef other():\n    return 1 / 0\n", True),
    ("HumanEval/2", TRUNC_BODY + "\nprint(truncate_number(2.5))\nwhile True: pass\n", True),
    ("HumanEval/2", TRUNC_BODY + "\nif __name__ == '__main__':\n    import os\n    os._exit(1)\n", True),
    ("HumanEval/2", TRUNC_BODY + "\n# tests\nassert False\n", True),
    ("HumanEval/0", CLOSE_BODY, True),
    ("HumanEval/0", CLOSE_BODY + "\n\nclass Unused:\n    pass\n", True),
    # near misses and broken programs
    ("HumanEval/53", fence(ADD.replace("x + y", "x - y")), False),
    ("HumanEval/53", fence(ADD.replace("x + y", "x + y + (x > 900)")), False),  # fails only the random tests
    ("HumanEval/0", fence(CLOSE.replace("abs(a - b)", "(a - b)")), False),  # forgot abs()
    ("HumanEval/8", fence(SUM_PRODUCT.replace("return s, p", "return [s, p]")), False),  # list, not tuple
    ("HumanEval/8", fence(SUM_PRODUCT.replace("s, p = 0, 1", "s, p = 0, 0")), False),  # empty product
    ("HumanEval/2", "    return int(number)\n", False),
    ("HumanEval/2", "    return round(number % 1.0, 1)\n", False),  # 1.33 -> 0.3
    ("HumanEval/53", fence("def add(x, y)\n    return x + y\n"), False),  # syntax error
    ("HumanEval/53", fence("def plus(x, y):\n    return x + y\n"), False),  # wrong name: the stub stays
    ("HumanEval/53", fence(ADD.replace("return x + y", "raise ValueError('no')")), False),
    ("HumanEval/53", fence(ADD.replace("return x + y", "print(x + y)")), False),  # prints, returns None
    ("HumanEval/53", fence(ADD.replace("return x + y", "return add(x, y)")), False),  # RecursionError
    ("HumanEval/53", fence(ADD.replace("return x + y", "return (i for i in [x + y])")), False),  # not plain data
    ("HumanEval/53", fence(ADD.replace("return x + y", "return str(x + y)")), False),
    ("HumanEval/53", fence(ADD.replace("return x + y", "return float(x + y) + 0.5")), False),
    ("HumanEval/53", f"<answer>{fence(ADD)}</answer><answer>{fence(ADD)}</answer>", False),  # hedging
    ("HumanEval/53", "I cannot write code.", False),
    ("HumanEval/53", "", False),  # the prompt's stub returns None
    ("HumanEval/32", fence(FIND_ZERO.replace("return lo", "return lo + 1")), False),
    ("HumanEval/33", fence(SORT_THIRD.replace("sorted(l[::3])", "sorted(l[::3], reverse=True)")), False),
]


@pytest.fixture(scope="module")
def task(tokenizer):
    return HumanEval(HumanEvalConfig(timeout_s=5), tokenizer)


def test_verifier_cases(task):
    assert len(CASES) >= 40
    verdicts = [task.verdict(t, text) for t, text, _ in CASES]
    wrong = [(t, text, v.reason) for (t, text, want), v in zip(CASES, verdicts) if v.passed != want]
    assert wrong == []


def test_program_from_keeps_the_prompt_for_imports_and_helpers():
    prompt = "from typing import List\n\ndef f(xs: List[int]) -> int:\n    \"\"\"doc\"\"\"\n"
    assert program_from(fence("def f(xs):\n    return 1\n"), prompt, "f") == prompt + "\ndef f(xs):\n    return 1\n"
    assert program_from("    return 1\ndef g(): pass\n", prompt, "f") == prompt + "    return 1\n"
    assert program_from("<answer>a</answer><answer>b</answer>", prompt, "f") is None


def test_task_batch_scoring_and_manifest(task):
    prompts = task.prompts("test", 164, 0)
    assert len(prompts) == 164 and len({p.id for p in prompts}) == 164
    by_id = {p.id: p for p in prompts}
    chosen = [by_id["HumanEval/53"], by_id["HumanEval/53"], by_id["HumanEval/8"]]
    s = task.score(chosen, [f"<think>t</think><answer>{fence(ADD)}</answer>", "while True: pass",
                            fence(SUM_PRODUCT)])
    assert s["accuracy"] == [1.0, 0.0, 1.0] and s["format"] == [0.1, 0.0, 0.0]
    assert task.manifest_info()["sandbox"]["level"] == "bwrap"
    assert "```python\n\n\ndef add(x: int, y: int):" in by_id["HumanEval/53"].text  # the chat prompt shows the stub


def test_splits(tokenizer):
    with pytest.raises(DataError, match="no train split"):
        HumanEval(HumanEvalConfig(), tokenizer).prompts("train", 1, 0)
    t = HumanEval(HumanEvalConfig(train_fraction=0.5), tokenizer)
    train, test = {r["task_id"] for r in t.records("train")}, {r["task_id"] for r in t.records("test")}
    assert train.isdisjoint(test) and len(train | test) == 164 and 50 < len(train) < 114
    base = HumanEval(HumanEvalConfig(chat_template=False), tokenizer).prompts("test", 1, 0)[0]
    assert base.text.rstrip().endswith('"""')  # the raw HumanEval prompt, continued by the model


def test_a_training_run_on_humaneval_records_the_isolation(tmp_path):
    from conftest import tiny_config
    from rlbench import rundir
    from rlbench.training.trainer import start

    cfg = tiny_config("train.steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2", "eval.n=2", "eval.kl=false",
                      "eval.after=true", task={"name": "humaneval", "train_fraction": 0.5, "timeout_s": 3})
    start(cfg, tmp_path / "he").run()
    man = json.loads((tmp_path / "he" / "manifest.json").read_text())
    assert man["task_info"]["sandbox"]["level"] == "bwrap" and man["task_info"]["sandbox"]["network_isolated"]
    m = rundir.read_jsonl(tmp_path / "he" / "metrics.jsonl")[0]
    assert m["reward/accuracy"] == 0.0 and "reward/format" in m  # a random model writes no working code
    ev = rundir.read_jsonl(tmp_path / "he" / "eval.jsonl")[-1]
    assert ev["n"] == 2 and all(i.startswith("HumanEval/") for i in ev["ids"])


def test_misbehaving_completions_score_zero_in_a_batch_and_the_rest_are_scored(tokenizer):
    import time

    from test_sandbox import BAD, _stray

    task = HumanEval(HumanEvalConfig(timeout_s=3, sandbox_workers=4), tokenizer)
    p = {x.id: x for x in task.prompts("test", 164, 0)}["HumanEval/53"]
    texts = [fence(ADD)] + [fence(code) for code in BAD.values()] + [ADD.split("\n", 1)[1]]
    t = time.perf_counter()
    s = task.score([p] * len(texts), texts)
    wall = time.perf_counter() - t
    assert s["accuracy"] == [1.0] + [0.0] * len(BAD) + [1.0]
    assert wall < (len(texts) / 4 + 1) * (3 + 2)  # bounded by the time limit, 4 programs at a time
    time.sleep(0.2)
    assert _stray() == []
