"""The quickstart end to end on the embedded model (about 25 minutes on 2 cores): run with -m slow."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_quickstart_improves_held_out_accuracy(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rlbench.cli", "run", "configs/quickstart.yaml", "--out", str(tmp_path),
                        "--set", "logging.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=3500)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [json.loads(x) for x in (tmp_path / "quickstart" / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    assert before["n"] >= 200 and after["n"] == before["n"]
    se = math.sqrt(before["stderr"] ** 2 + after["stderr"] ** 2)
    assert after["accuracy"] - before["accuracy"] >= 2 * se, (before["accuracy"], after["accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gsm8k_quickstart_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rlbench.cli", "run", "configs/gsm8k_quickstart.yaml", "--out", str(tmp_path),
                        "--set", "logging.progress=false", "--set", "train.steps=2", "--set", "eval.n=20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=3500)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "gsm8k-quickstart"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("reward/accuracy" in m and "reward/format" in m for m in metrics)
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["n"] for e in evals] == [20, 20] and all(i.startswith("gsm8k/test/") for i in evals[0]["ids"])
