"""``rlbench suite plan``: its FLOPs against a real run's cost.json, its seeds against statsmodels."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rlbench.suites import plan as planmod
from rlbench.suites import suite

ROOT = Path(__file__).resolve().parent.parent


def _spec(tmp_path, budget="", algorithms="[grpo, ppo]"):
    path = tmp_path / "s.yaml"
    path.write_text(f"""
name: p
base: {ROOT / "configs" / "smoke.yaml"}
matrix: {{algorithm: {algorithms}, seed: [0, 1]}}
set: ["train.steps=2", "rollout.max_tokens=8", "eval.kl=false", "eval.after=false", "eval.before=false"]
{budget}
probe: false
""")
    return path


def test_plan_flops_match_a_real_runs_cost_json(tmp_path):
    spec = suite.load(_spec(tmp_path, algorithms="[ppo]"))
    runs = suite.expand(spec)
    name, cfg = runs[0]
    out = tmp_path / "runs"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    r = subprocess.run([sys.executable, "-m", "rlbench.cli", "run", str(cfg_path), "--out", str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    real = json.loads((out / name / "cost.json").read_text())["flops_estimate"]
    measured = planmod.plan(spec, planmod.Assumptions(measure=True))
    assert measured["runs"][0]["source"] == "measured"
    assert measured["runs"][0]["flops"] == pytest.approx(real, rel=0.05)
    estimated = planmod.plan(spec, planmod.Assumptions())  # a random model writes to the token limit
    assert estimated["runs"][0]["flops"] == pytest.approx(real, rel=0.05)
    assert measured["flops"] == pytest.approx(2 * measured["runs"][0]["flops"])  # both seeds, one measurement


def test_plan_budget_hours_price_and_seeds_against_statsmodels(tmp_path):
    from statsmodels.stats.power import TTestPower

    spec = suite.load(_spec(tmp_path, budget="budget: {flops: 2.0e+12}"))
    p = planmod.plan(spec, planmod.Assumptions(accelerator="H100", mfu=0.5, jobs=2, mde=0.05, sd=0.1))
    assert [r["source"] for r in p["runs"]] == ["budget"] * 4 and p["flops"] == 4 * 2.0e12
    hours = 2.0e12 / (9.89e14 * 0.5) / 3600
    assert p["runs"][0]["device_hours"] == pytest.approx(hours) and p["runs"][0]["price_usd"] == pytest.approx(hours * 2.49)
    assert p["wall_hours"] == pytest.approx(4 * hours / 2)
    want = math.ceil(TTestPower().solve_power(effect_size=0.5, power=0.8, alpha=0.05, alternative="two-sided"))
    assert p["seeds_needed"] == want == 34
    assert p["device_hours_at_seeds"] == pytest.approx(4 * hours / 2 * 34)
    text = planmod.table(p)
    assert "needs 34 seeds; this suite has 2" in text
    with pytest.raises(ValueError, match="no peak_flops for accelerator 'tpu'"):
        planmod.plan(spec, planmod.Assumptions(accelerator="tpu"))


def test_plan_cli_reads_the_sd_from_a_report(tmp_path):
    spec = _spec(tmp_path)
    r = subprocess.run([sys.executable, "-m", "rlbench.cli", "suite", "plan", str(spec), "--mde", "0.1", "--sd-from",
                        str(ROOT / "reports" / "compute-matched"), "--json"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    p = json.loads(r.stdout)
    assert p["sd"] == pytest.approx(planmod.sd_from_report(ROOT / "reports" / "compute-matched")) and p["seeds_needed"] > 2
    bad = subprocess.run([sys.executable, "-m", "rlbench.cli", "suite", "plan", str(spec), "--mde", "0.1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and "needs --sd" in bad.stderr
