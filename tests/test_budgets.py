"""Compute budgets and evaluations at budget fractions (rlbench/training/cost.py, rlbench/training/trainer.py), the
accuracy-vs-compute tables (rlbench/reporting/curves.py), paired randomness and the determinism tier.
Real training runs on tiny-random with the hf engine; the suite-level FLOP budget over every
algorithm is tests/test_suite_report.py::test_smoke_suite_under_a_flop_budget."""
import dataclasses
import json

import pytest
from conftest import tiny_config

from rlbench import config, rundir
from rlbench.reporting import curves
from rlbench.suites import suite
from rlbench.training.trainer import start


def test_evals_at_budget_fractions_of_the_steps_and_a_flop_budget(tmp_path):
    # no compute budget: fractions of train.steps (4 steps: 0.5 is step 2, 0.75 step 3)
    start(tiny_config("train.steps=4", "eval.at_budget_fractions=[1, 0.5, 0, 0.75]"), tmp_path / "a").run()
    evals = rundir.read_jsonl(tmp_path / "a" / "eval.jsonl")
    assert [(e["step"], e["budget_fractions"]) for e in evals] == [(0, [0.0]), (2, [0.5]), (3, [0.75]), (4, [1.0])]
    assert [e["budget_fraction"] for e in evals] == [0.0, 0.5, 0.75, 1.0]
    metrics = rundir.read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert evals[1]["spent"] == {k[len("spent/"):]: v for k, v in metrics[1].items() if k.startswith("spent/")}

    # a FLOP budget of 2.5 of this config's steps: it stops after step 3, the first at or past it
    per_step = metrics[0]["spent/flops"]
    cfg = tiny_config("train.steps=50", f"train.max_flops={2.5 * per_step}", "eval.at_budget_fractions=[0, 0.5, 1]")
    start(cfg, tmp_path / "b").run()
    cost = json.loads((tmp_path / "b" / "cost.json").read_text())
    assert cost["stopped_by"] == "flop_budget" and cost["steps_done"] == 3
    assert cost["spent"]["flops"] == cost["flops_estimate"] == pytest.approx(3 * per_step, rel=0.05)
    assert cost["budget"] == {"flops": pytest.approx(2.5 * per_step)}
    evals = rundir.read_jsonl(tmp_path / "b" / "eval.jsonl")
    assert [(e["step"], e["budget_fractions"]) for e in evals] == [(0, [0.0]), (2, [0.5]), (3, [1.0])]
    # prompt prefill is counted (twice the prompt tokens: in the rollout and in the reference pass)
    assert cost["tokens_prompt"] > 0
    assert cost["tokens_reference"] == pytest.approx(cost["tokens_prompt"] + cost["tokens_generated"])


def test_a_device_second_budget_stops_the_run_and_skips_eval_time(tmp_path):
    cfg = tiny_config("train.steps=50", "train.max_device_seconds=0.5", "eval.before=true", "eval.n=16")
    start(cfg, tmp_path / "r").run()
    cost = json.loads((tmp_path / "r" / "cost.json").read_text())
    metered = sum(v for k, v in cost["wall_seconds"].items() if k not in ("load", "eval"))
    assert cost["stopped_by"] == "device_second_budget" and cost["spent"]["device_seconds"] >= 0.5
    assert cost["spent"]["device_seconds"] == pytest.approx(metered, abs=0.05)
    assert metered < cost["wall_seconds_total"] - cost["wall_seconds"]["eval"]
    # it stopped after the step whose metered seconds first reached the budget, not before, not later
    spent = [m["time_spent/device_seconds"] for m in rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")]
    assert len(spent) == cost["steps_done"] and spent[-1] >= 0.5 and all(v < 0.5 for v in spent[:-1])


def test_budget_config_and_suite_keys(tmp_path):
    with pytest.raises(config.ConfigError, match=r"eval\.at_budget_fractions must be numbers in \[0, 1\]"):
        tiny_config("eval.at_budget_fractions=[0, 1.5]")
    with pytest.raises(config.ConfigError, match=r"train\.max_flops must be >= 0"):
        tiny_config("train.max_flops=-1")
    with pytest.raises(config.ConfigError, match=r"batch_invariant_sampling must be true, false or auto"):
        tiny_config("rollout.batch_invariant_sampling=sometimes")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nbase: %s\nbudget: {flops: 1.0e12, device_seconds: 30, steps: 9}\n"
                    "matrix: {algorithm: [grpo, rloo]}\n" % (suite.Path(__file__).parent.parent / "configs/smoke.yaml"))
    runs = suite.expand(suite.load(spec))
    for _, cfg in runs:  # budgets go to train.*; paired randomness is on (auto) in every run of a suite
        assert (cfg.train.max_flops, cfg.train.max_device_seconds, cfg.train.steps) == (1e12, 30.0, 9)
        assert cfg.rollout.batch_invariant_sampling == "auto"
    spec.write_text(spec.read_text().replace("flops: 1.0e12", "petaflops: 1"))
    with pytest.raises(config.ConfigError, match="budget may set"):
        suite.load(spec)


def test_batch_invariance_resolves_per_engine_and_the_manifest_records_the_tier(tmp_path):
    from plugins.engines.hf import HFEngine
    from plugins.engines.vllm import VLLMEngine

    from rlbench.training.sampler import resolve_batch_invariance

    assert not VLLMEngine.supports_batch_invariance("cpu") and VLLMEngine.supports_batch_invariance("cuda")
    assert (HFEngine.determinism, VLLMEngine.determinism) == ("bitwise", "seeded")
    cfg = tiny_config("rollout.batch_invariant_sampling=auto")
    assert resolve_batch_invariance(cfg, "cpu") is True  # hf honours per-prompt seeds
    cfg = tiny_config("rollout.batch_invariant_sampling=true")
    cfg = dataclasses.replace(cfg, names={**cfg.names, "engine": "vllm"})
    assert resolve_batch_invariance(cfg, "cpu") is True  # explicit: the user's choice (with a warning)
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, batch_invariant_sampling="auto"))
    assert resolve_batch_invariance(cfg, "cpu") is False

    start(tiny_config("train.steps=1", "rollout.batch_invariant_sampling=auto"), tmp_path / "r").run()
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["batch_invariant_sampling"] is True and man["determinism"]["tier"] == "bitwise"
    assert rundir.determinism_tier("bitwise", "cuda:0", 1, 0) == {"tier": "seeded", "engine": "bitwise",
                                                                 "reasons": ["GPU kernels"]}
    assert rundir.determinism_tier("bitwise", "cpu", 2, 1)["reasons"] == ["2 processes", "asynchronous rollouts"]
    assert rundir.determinism_tier("whatever", "cpu", 1, 0)["tier"] == "none"


def _run(algo, seed, points):
    return {"row": {"task": "t", "algorithm": algo, "seed": seed},
            "evals": [{"budget_fractions": [f], "accuracy": a, "spent": {"flops": c, "tokens": c / 10},
                       "time_spent": {"device_seconds": c / 100, "wall_seconds": 1}}
                      for f, c, a in points]}


def test_curve_tables_by_hand():
    runs = [_run("grpo", 0, [(0, 0, 0.2), (0.5, 50, 0.4), (1, 100, 0.6)]),
            _run("grpo", 1, [(0, 0, 0.2), (0.5, 52, 0.5), (1, 104, 0.5)]),
            _run("rloo", 0, [(0, 0, 0.2), (0.5, 51, 0.3), (1, 101, 0.7)]),
            _run("rloo", 1, [(0, 0, 0.2), (0.5, 49, 0.5), (1, 99, 0.6)])]
    res = curves.build(runs, "grpo", x="device_hours")
    g = [r for r in res["curve"] if r["algorithm"] == "grpo"]
    assert [r["fraction"] for r in g] == [0, 0.5, 1] and g[1]["accuracy_mean"] == pytest.approx(0.45)
    assert g[2]["device_hours"] == pytest.approx(1.02 / 3600)
    auc = {r["algorithm"]: r["auc_mean"] for r in res["auc"]}
    # trapezoids over the fraction axis: seed 0 (0.2+0.4)/4 + (0.4+0.6)/4 = 0.4, seed 1 (0.7+1.0)/4 = 0.425
    assert auc["grpo"] == pytest.approx((0.4 + 0.425) / 2)
    d = {r["fraction"]: r for r in res["diffs"]}
    assert d[1]["mean_diff"] == pytest.approx((0.1 + 0.1) / 2) and d[0.5]["mean_diff"] == pytest.approx(-0.05)
    from scipy import stats

    assert d[0.5]["t_test_p"] == pytest.approx(stats.ttest_rel([0.3, 0.5], [0.4, 0.5]).pvalue)
    assert all(not f["identifiable"] and "point(s) after the start" in f["why"] for f in res["fits"])
    assert "not identifiable" in curves.fit_sentence(res["fits"][0], "flops")
    assert curves.build([{"row": runs[0]["row"], "evals": [{"accuracy": 0.1}]}], "grpo") is None
    with pytest.raises(ValueError, match="--x must be one of"):
        curves.build(runs, "grpo", x="joules")
