"""Evaluation and reward scoring: pass@k by hand, the eval and reward commands end to end."""
import json
import math

import pytest

from rlbench import cli
from rlbench.training.evaluation import interval, pass_at_k


def test_pass_at_k_by_hand():
    # n = 5 samples, c = 2 correct: pass@1 = 2/5; pass@2 = 1 − C(3,2)/C(5,2) = 1 − 3/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n − c < k: some draw must hit
    mean, se, half = interval([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4)) and half == pytest.approx(1.96 * se)


def test_reward_command(tmp_path, capsys):
    rows = [{"completion": "<think>t</think><answer>$1,234.00</answer>", "answer": "#### 1234"},
            {"completion": "the answer is 7", "answer": 8, "id": "x"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert cli.main(["reward", "gsm8k", "--input", str(inp), "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in scored] == pytest.approx([1.1, 0.0])
    assert scored[0]["components"] == {"accuracy": 1.0, "format": 0.1} and scored[1]["id"] == "x"
    inp.write_text(json.dumps({"completion": "\\boxed{1}"}) + "\n")
    assert cli.main(["reward", "math", "--input", str(inp)]) == 2
    assert "line 1: missing 'answer'" in capsys.readouterr().err
    assert cli.main(["reward", "gsm8k", "--input", str(tmp_path / "missing.jsonl")]) == 2


def test_eval_command_on_a_tiny_model(tmp_path):
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--model", "tiny-random", "--task", "arithmetic", "--limit", "6", "--samples", "3",
                     "--max-tokens", "4", "--engine", "hf", "--output", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["n"] == 6 and rec["samples"] == 3 and set(rec["pass@k"]) == {"1", "2"}
    assert len(rec["correct"]) == 6 and all(0 <= c <= 3 for c in rec["correct"])
    assert rec["accuracy"] == pytest.approx(sum(rec["correct"]) / 18)
    assert rec["ci95"][0] <= rec["accuracy"] <= rec["ci95"][1]
    assert len(rec["completions"]) == 18 and sum(c["accuracy"] for c in rec["completions"]) == sum(rec["correct"])
    assert cli.main(["eval", "--model", "tiny-random", "--task", "arithmetic", "--limit", "2", "--engine", "hf",
                     "--set", "digitz=2", "--output", str(out)]) == 2  # a wrong task option is a config error
