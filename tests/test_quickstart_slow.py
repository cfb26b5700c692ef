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
