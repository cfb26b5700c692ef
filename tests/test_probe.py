"""The learnability probe (rlbench/suites/probe.py): its figures against hand counts, and the CLI on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from rlbench.suites import probe

ROOT = Path(__file__).resolve().parent.parent


def _record(groups):
    """An evaluation record (as ``evaluate(keep_completions=True)`` returns) of per-prompt
    [(accuracy, format), …] groups."""
    comps, correct = [], []
    for i, g in enumerate(groups):
        comps += [{"id": f"p{i}", "text": "", "accuracy": a, "format": f} for a, f in g]
        correct.append(sum(a >= 1 for a, _ in g))
    G = len(groups[0])
    acc = sum(c / G for c in correct) / len(groups)
    n = len(comps)
    return {"n": len(groups), "ids": [f"p{i}" for i in range(len(groups))], "completions": comps, "correct": correct,
            "accuracy": acc, "ci95": [0.0, 1.0], "format_rate": sum(c["format"] > 0 for c in comps) / n,
            "truncated_frac": 0.0, "completion_len": 5.0}


def test_summary_counts_groups_without_signal_by_hand():
    groups = [[(1.0, 0.1)] * 3,                          # all correct, same format: no signal
              [(1.0, 0.1), (0.0, 0.1), (0.0, 0.1)],      # one correct of three: signal
              [(0.0, 0.1), (0.0, 0.0), (0.0, 0.0)],      # none correct, the format differs: signal
              [(0.0, 0.0)] * 3]                          # nothing at all: no signal
    greedy = {"accuracy": 0.25}
    rec = probe.summarize(_record(groups), greedy, group_size=3, prompts_per_step=8)
    assert rec["uniform_groups"] == pytest.approx(2 / 4)
    assert rec["signal_prompts_per_step"] == pytest.approx(4.0)
    assert rec["accuracy_signal_groups"] == pytest.approx(1 / 4)  # group 3 differs in format only
    assert rec["accuracy_signal_prompts_per_step"] == pytest.approx(2.0)
    assert rec["accuracy_sampled"] == pytest.approx((1 + 1 / 3 + 0 + 0) / 4)
    # accuracy-only prediction at G = 2 with p = (1, 1/3, 0, 0): 1 - mean(p² + (1-p)²) = 1 - (3 + 5/9) / 4
    assert rec["predicted_signal_by_group_size"]["2"] == pytest.approx(1 - (3 + 5 / 9) / 4)
    # p = (1, 1/3, 0, 0): at any G at most a quarter of the groups differ in accuracy
    assert rec["verdict"].startswith("weak signal: only 25% of groups differ in accuracy at G=3 (25% more differ "
                                     "in the format reward only); raise rollout.temperature")
    # the same problem drawn twice: the rollouts' group indices, not the ids, say which completions belong together
    twice = _record([[(1.0, 0.0), (0.0, 0.0)], [(1.0, 0.0), (1.0, 0.0)]])
    twice["ids"] = ["p0", "p0"]
    for c in twice["completions"]:
        c["id"] = "p0"
    rec2 = probe.summarize(twice, greedy, group_size=2, prompts_per_step=2, groups=[0, 0, 1, 1])
    assert rec2["prompts"] == 2 and rec2["uniform_groups"] == pytest.approx(0.5)
    assert rec["group_rewards"][2] == pytest.approx([0.1, 0.0, 0.0])


def test_verdicts_name_the_knob():
    hard = [[(1.0, 0.1), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)]] + [[(0.0, 0.0)] * 4] * 7  # one prompt of 8 has signal
    rec = probe.summarize(_record(hard), {"accuracy": 0.0}, group_size=4, prompts_per_step=8)
    assert rec["uniform_groups"] == pytest.approx(7 / 8)
    # p = (1/4, 0 × 7): signal share at G is (1 - 0.25^G - 0.75^G) / 8, never ≥ 0.5: no group size helps
    assert rec["verdict"].startswith("weak signal: only 12% of groups differ in accuracy")
    assert "temperature or use an easier task" in rec["verdict"]
    half = [[(1.0, 0.0), (0.0, 0.0)], [(1.0, 0.0), (1.0, 0.0)], [(0.0, 0.0), (0.0, 0.0)], [(1.0, 0.0), (0.0, 0.0)]]
    rec = probe.summarize(_record(half), {"accuracy": 0.5}, group_size=2, prompts_per_step=4)
    # p = (1/2, 1, 0, 1/2): signal at G=4 is (1 - 2/16) * 2/4 = 0.4375, at G=8 (1 - 2/256) / 2 = 0.496, G=16 0.49998...
    assert rec["predicted_signal_by_group_size"]["4"] == pytest.approx((1 - 2 / 16) / 2)
    assert rec["verdict"].startswith("learnable: 50% of groups differ in accuracy (~2.0 of 4 prompts per step) at")
    saturated = [[(1.0, 0.1)] * 4] * 9 + [[(1.0, 0.1), (0.0, 0.1), (1.0, 0.1), (1.0, 0.1)]]
    rec = probe.summarize(_record(saturated), {"accuracy": 1.0}, group_size=4, prompts_per_step=8)
    assert rec["verdict"].startswith("saturated")
    flat = [[(0.0, 0.0)] * 4] * 10
    rec = probe.summarize(_record(flat), {"accuracy": 0.3}, group_size=4, prompts_per_step=8)
    assert rec["verdict"].startswith("flat") and "lower rollout.temperature" in rec["verdict"]
    rec = probe.summarize({**_record(half), "truncated_frac": 0.5}, {"accuracy": 0.5}, group_size=2, prompts_per_step=4)
    assert rec["verdict"].startswith("budget-bound: 50%")


def test_probe_cli_on_the_tiny_model(tmp_path):
    cfg = {**TINY, "task": {"name": "first_char"}, "rollout": {"prompts_per_step": 4, "group_size": 4, "max_tokens": 4}}
    cfg["model"] = {"name": "tiny-random", "tiny_init_std": 0.3}
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RLBENCH_PLUGINS": "rlbench_testing_plugins",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "rlbench.cli", "probe", str(path), "--prompts", "12"]
    r = subprocess.run(args + ["--json", "--output", str(tmp_path / "p.json")], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec == json.loads((tmp_path / "p.json").read_text())
    groups = rec["group_rewards"]
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)
    by_hand = sum(1 for g in groups if len(set(g)) == 1) / len(groups)
    assert rec["uniform_groups"] == pytest.approx(by_hand)
    assert 0 < by_hand < 1  # the tiny model with init std 0.3 gets some groups right and some mixed
    assert rec["signal_prompts_per_step"] == pytest.approx((1 - by_hand) * 4)
    assert rec["accuracy_sampled"] == pytest.approx(sum(map(sum, groups)) / 48)
    # the table form prints the same figures (the probe is seeded by run.seed) and the verdict
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{rec['uniform_groups']:.3f} (no group-relative signal)" in r.stdout and "\nverdict: " in r.stdout
    bad = subprocess.run(args[:-1] + ["0"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert bad.returncode == 2 and "--prompts must be >= 1" in bad.stderr
