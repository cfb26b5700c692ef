"""Reports whose numbers mean what they say: small-sample intervals (Student t, labelled), power
with its uncertainty, the problem-level test per seed and stratified, the two-way model, labelled
variants kept apart, an unknown baseline refused, compute-matched fractions on costly steps, and
regressed runs flagged — each against scipy / statsmodels or a hand computation."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from rlbench.reporting import compare, report, stats
from rlbench.suites import suite

ROOT = Path(__file__).resolve().parent.parent


# -- statistics by hand ------------------------------------------------------------------------------

def test_interval_of_three_values_is_the_t_interval_and_says_so():
    vals = [0.48, 0.73, 0.80]
    iv = stats.interval(vals)
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(vals), scale=sps.sem(vals))
    assert iv["method"] == "t" and iv["low"] == pytest.approx(lo) and iv["high"] == pytest.approx(hi)
    assert iv["low"] < min(vals) and iv["high"] > max(vals)  # not [min, max], as the bootstrap of 3 values is
    many = stats.interval(np.linspace(0, 1, 12))
    assert many["method"] == "bootstrap" and 0 < many["low"] < 0.5 < many["high"] < 1
    assert stats.interval([0.5])["method"] == "none" and math.isnan(stats.interval([0.5])["low"])
    assert math.isnan(stats.iqm([1, 2, 3])) and stats.iqm([1, 2, 3, 100]) == pytest.approx(2.5)


def test_an_accuracy_interval_is_cut_at_the_range_an_accuracy_can_take():
    vals = [0.80, 0.95, 1.0]  # the t interval of these reaches past 1
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(vals), scale=sps.sem(vals))
    assert hi > 1
    iv = stats.interval(vals, bounds=stats.ACCURACY)
    assert iv["clipped"] and iv["high"] == 1.0 and iv["low"] == pytest.approx(lo)
    assert not stats.interval(vals)["clipped"] and stats.interval(vals)["high"] == pytest.approx(hi)
    down = stats.interval([-0.9, -0.5, -0.95], bounds=stats.ACCURACY_CHANGE)  # a change of accuracy: [-1, 1]
    assert down["clipped"] and down["low"] == -1.0
    inside = stats.interval([0.4, 0.5, 0.6], bounds=stats.ACCURACY)
    assert not inside["clipped"] and 0 < inside["low"] < inside["high"] < 1


def test_power_carries_the_uncertainty_of_the_seeds_spread():
    d = [0.05, -0.1, 0.2]
    rec = compare.paired_power(d, mde=0.05)
    sd, n = np.std(d, ddof=1), 3
    lo, hi = sd * math.sqrt(2 / sps.chi2.ppf(0.975, 2)), sd * math.sqrt(2 / sps.chi2.ppf(0.025, 2))
    assert rec["sd_low"] == pytest.approx(lo) and rec["sd_high"] == pytest.approx(hi)
    assert lo / sd == pytest.approx(0.52, abs=0.01) and hi / sd == pytest.approx(6.28, abs=0.02)
    assert rec["mdd_low"] < rec["mdd"] < rec["mdd_high"]
    assert rec["seeds_for_mde_low"] <= rec["seeds_for_mde"] <= rec["seeds_for_mde_high"]
    assert "seeds_for_observed" not in rec  # post-hoc power is a restatement of p: not reported
    s = compare.power_sentence("ppo", "grpo", rec)
    assert f"±{rec['mdd_low']:.3f} to ±{rec['mdd_high']:.3f}" in s and f"{int(rec['seeds_for_mde_high'])})" in s


def test_holm_against_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, float("nan")]
    assert stats.holm(p)[:3] == pytest.approx(list(multipletests(p[:3], method="holm")[1]))
    assert math.isnan(stats.holm(p)[3])


def test_stratified_mcnemar_against_statsmodels_on_a_hand_made_table():
    from statsmodels.stats.contingency_tables import StratifiedTable, mcnemar

    # seed 0: A right on problems 0-5, B on 0-1 (4 discordant for A); seed 1: A 0-2, B 0-3 (1 for B)
    a0 = {i: i < 6 for i in range(10)}
    b0 = {i: i < 2 for i in range(10)}
    a1 = {i: i < 3 for i in range(10)}
    b1 = {i: i < 4 for i in range(10)}
    res = stats.problem_level({0: (a0, b0), 1: (a1, b1)})
    assert [(s["a_only"], s["b_only"]) for s in res["seeds"]] == [(4, 0), (0, 1)]
    assert res["seeds"][0]["p"] == pytest.approx(mcnemar([[2, 4], [0, 4]], exact=True).pvalue)  # 2·(1/2)^4
    assert res["seeds"][0]["p"] == pytest.approx(0.125)
    # statsmodels' CMH over one 2×2 stratum per (seed, problem): rows A/B, columns right/wrong
    tables = []
    for a, b in ((a0, b0), (a1, b1)):
        tables += [np.array([[int(a[i]), 1 - int(a[i])], [int(b[i]), 1 - int(b[i])]]) for i in range(10)]
    cmh = StratifiedTable(tables).test_null_odds(correction=True)
    assert res["cmh_p"] == pytest.approx(cmh.pvalue) and res["cmh_statistic"] == pytest.approx(cmh.statistic)
    # on paired answers it is McNemar's corrected χ² on the discordant pairs summed over seeds: (|4 − 1| − 1)² / 5
    assert res["cmh_statistic"] == pytest.approx((abs(4 - 1) - 1) ** 2 / 5)
    assert res["net"] == 3 and res["top_seed"] == 0 and res["top_seed_net"] == 4
    assert res["top_seed_share"] == pytest.approx(4 / 3)  # above 1: the other seed went the other way


def test_two_way_model_against_statsmodels_ols_on_a_hand_made_suite():
    import statsmodels.api as sm

    acc = {"grpo": [0.6, 0.7, 0.5, 0.65], "ppo": [0.62, 0.75, 0.49, 0.7], "rloo": [0.5, 0.66, 0.45, 0.6]}
    rows = [{"group": g, "seed": s, "value": v} for g, vs in acc.items() for s, v in enumerate(vs)]
    res = stats.two_way(rows, "grpo")
    # by hand: intercept, ppo, rloo dummies, seed 1..3 dummies
    X = np.array([[1, g == "ppo", g == "rloo", s == 1, s == 2, s == 3] for g in acc for s in range(4)], dtype=float)
    y = np.array([v for vs in acc.values() for v in vs])
    ols = sm.OLS(y, X).fit()
    assert res["df_resid"] == 6 and res["residual_sd"] == pytest.approx(math.sqrt(ols.scale))
    for i, g in ((1, "ppo"), (2, "rloo")):
        assert res["groups"][g]["diff"] == pytest.approx(ols.params[i])
        assert res["groups"][g]["se"] == pytest.approx(ols.bse[i])
        assert res["groups"][g]["p"] == pytest.approx(ols.pvalues[i])
    assert stats.two_way(rows[:8], "grpo") is None  # two groups: the paired t-test is the test


# -- reports from run directories ----------------------------------------------------------------------

def _run(root: Path, cfg: dict, accs: list[tuple[int, float, float]], correct_seed: int = 0, n: int = 100):
    """A run directory as the trainer writes it: ``accs`` = (step, actual budget fraction, accuracy)."""
    d = root / "runs" / cfg["run"]["name"]
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "manifest.json").write_text(json.dumps({"versions": {"torch": "x"}, "engine": "hf", "device": "cpu",
                                                 "batch_invariant_sampling": True, "determinism": {"tier": "bitwise"}}))
    steps = max(s for s, _, _ in accs)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kl": 0.01 * s, "reward/mean": 0.5}) + "\n"
                                             for s in range(1, steps + 1)))
    fractions = sorted({f for f in cfg["eval"]["at_budget_fractions"]})
    lines, done = [], set()
    for step, actual, acc in accs:
        tags = [f for f in fractions if f <= actual + 1e-12 and f not in done and (f < 1 or step == steps)]
        done.update(tags)
        rng = np.random.default_rng(correct_seed * 1000 + step)
        k = int(round(acc * n))
        correct = [True] * k + [False] * (n - k)
        rng.shuffle(correct)
        lines.append({"step": step, "accuracy": acc, "n": n, "stderr": math.sqrt(acc * (1 - acc) / n),
                      "correct": [bool(c) for c in correct], "ids": [f"p{i}" for i in range(n)], "kl": 0.1,
                      "budget_fraction": actual, "budget_fractions": tags, "spent": {"flops": actual * 1e12, "tokens": 1},
                      "time_spent": {"device_seconds": 1.0, "wall_seconds": 1.0}})
    (d / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "cost.json").write_text(json.dumps({"flops_estimate": accs[-1][1] * 1e12, "stopped_by": "flop_budget"}))
    return d


def _suite_dir(tmp_path, spec_text: str) -> tuple[Path, list]:
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text)
    loaded = suite.load(spec)
    root = tmp_path / "out" / loaded["name"]
    (root / "runs").mkdir(parents=True)
    runs = suite.expand(loaded)
    (root / "status.json").write_text(json.dumps({"runs": {n: {"status": "complete"} for n, _ in runs}}))
    (root / "suite.json").write_text(json.dumps({"name": loaded["name"], "path": str(spec)}))
    return root, runs


def _small_suite(tmp_path, name: str, algorithms: str, seeds: str = "[0, 1]", set_: str = ""):
    """A suite on the smoke config (``set_``: its ``set`` line, if any) laid out as ``_suite_dir`` does."""
    return _suite_dir(tmp_path, f"""
name: {name}
base: {ROOT / "configs" / "smoke.yaml"}
matrix: {{algorithm: {algorithms}, seed: {seeds}}}
{set_}
""")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rlbench.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_labelled_variants_are_two_groups_with_paired_tests(tmp_path):
    root, runs = _suite_dir(tmp_path, f"""
name: variants
base: {ROOT / "configs" / "smoke.yaml"}
matrix:
  algorithm: [grpo, {{name: grpo, scale_std: false, label: grpo_nostd}}, {{name: grpo, beta: 0.0}}]
  seed: [0, 1, 2]
set: ["eval.at_budget_fractions=[0, 0.5, 1]"]
""")
    cfgs = {name: c.to_dict() for name, c in runs}
    assert cfgs["grpo_nostd-arithmetic-s0"]["algorithm"]["label"] == "grpo_nostd"
    assert cfgs["grpo-beta0.0-arithmetic-s0"]["algorithm"]["label"] == "grpo-beta0.0"  # options without a label
    assert "label" not in cfgs["grpo-arithmetic-s0"]["algorithm"]
    final = {"grpo": [0.6, 0.7, 0.65], "grpo_nostd": [0.7, 0.75, 0.8], "grpo-beta0.0": [0.62, 0.66, 0.7]}
    for name, cfg in cfgs.items():
        label = cfg["algorithm"].get("label", "grpo")
        seed = cfg["run"]["seed"]
        _run(root, cfg, [(0, 0.0, 0.5), (2, 0.5, 0.55), (4, 1.0, final[label][seed])], correct_seed=seed)
    out = tmp_path / "rep"
    r = _cli("report", str(root), "--out", str(out))
    assert r.returncode == 0, r.stderr
    agg = {a["algorithm"]: a for a in csv.DictReader(open(out / "aggregate.csv"))}
    assert set(agg) == {"grpo", "grpo_nostd", "grpo-beta0.0"} and all(a["seeds"] == "3" for a in agg.values())
    assert all(a["accuracy_after_ci_method"] == "t" for a in agg.values())
    t_lo, t_hi = sps.t.interval(0.95, 2, loc=0.75, scale=sps.sem([0.7, 0.75, 0.8]))
    assert float(agg["grpo_nostd"]["accuracy_after_ci_low"]) == pytest.approx(t_lo)
    assert float(agg["grpo_nostd"]["accuracy_after_ci_high"]) == pytest.approx(t_hi)
    power = {p["algorithm"]: p for p in csv.DictReader(open(out / "power.csv"))}
    assert set(power) == {"grpo_nostd", "grpo-beta0.0"} and power["grpo_nostd"]["paired_seeds"] == "3"
    assert float(power["grpo_nostd"]["t_test_p"]) == pytest.approx(sps.ttest_rel([0.7, 0.75, 0.8], [0.6, 0.7, 0.65]).pvalue)
    md = (out / "report.md").read_text()
    assert "grpo_nostd" in md and "Two-way model" in md and "ci_method" in md
    per_seed = list(csv.DictReader(open(out / "mcnemar.csv")))
    assert {(p["algorithm"], p["seed"]) for p in per_seed} == {(a, s) for a in ("grpo_nostd", "grpo-beta0.0")
                                                               for s in ("0", "1", "2")}
    # an unknown baseline: an error naming the groups, nothing written
    bad = _cli("report", str(root), "--out", str(tmp_path / "bad"), "--baseline", "grpoo")
    assert bad.returncode != 0 and "grpoo" in bad.stderr and "grpo_nostd" in bad.stderr and "grpo-beta0.0" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_two_runs_of_one_group_and_seed_are_an_error(tmp_path):
    root, runs = _small_suite(tmp_path, "dup", "[grpo]", "[0]")
    cfg = runs[0][1].to_dict()
    _run(root, cfg, [(0, 0.0, 0.5), (1, 1.0, 0.6)])
    cfg2 = json.loads(json.dumps(cfg))
    cfg2["run"]["name"] = "another"
    cfg2["algorithm"]["scale_std"] = False  # different options, no label: a report would merge the two
    _run(root, cfg2, [(0, 0.0, 0.5), (1, 1.0, 0.7)])
    with pytest.raises(report.ReportError, match="would merge them"):
        report.build([root / "runs"], tmp_path / "rep")


def test_costly_steps_get_actual_fractions_and_the_coarse_budget_warning(tmp_path):
    root, runs = _small_suite(tmp_path, "costly", "[grpo, ppo]",
                              set_='set: ["eval.at_budget_fractions=[0, 0.125, 0.25, 0.5, 0.75, 1]"]')
    for name, c in runs:
        cfg, seed = c.to_dict(), c.run.seed
        if cfg["algorithm"]["name"] == "grpo":  # 0.18 of the budget per step; evaluated where a fraction is first reached
            accs = [(0, 0.0, 0.5), (1, 0.18, 0.6), (2, 0.36, 0.62), (3, 0.54, 0.7), (5, 0.9, 0.72),
                    (6, 1.08, 0.75 + 0.02 * seed)]
        else:  # three tenths per step: 0.125 and 0.25 are reached by one step, four steps for five fractions
            accs = [(0, 0.0, 0.5), (1, 0.3, 0.58), (2, 0.6, 0.66), (3, 0.9, 0.7), (4, 1.2, 0.74 + 0.02 * seed)]
        _run(root, cfg, accs, correct_seed=seed)
    out = tmp_path / "rep"
    res = report.build([root], out)
    curve = {(r["algorithm"], float(r["fraction"])): r for r in csv.DictReader(open(out / "curves.csv"))}
    assert float(curve[("ppo", 0.25)]["fraction_actual"]) == pytest.approx(0.3)
    assert float(curve[("ppo", 0.125)]["fraction_actual"]) == pytest.approx(0.0)  # the nearest evaluation is step 0
    assert float(curve[("ppo", 1.0)]["fraction_actual"]) == pytest.approx(0.9)  # nearer than the last (1.2)
    assert curve[("ppo", 1.0)]["off_fraction"] == "0"  # 0.1 away: within half of a 0.3 step
    assert curve[("grpo", 0.25)]["off_fraction"] == "0" and float(curve[("grpo", 0.25)]["fraction_actual"]) == pytest.approx(0.18)
    # no evaluation between 0.54 and 0.9: 0.75 is matched 0.15 away, more than half of a 0.18 step
    assert float(curve[("grpo", 0.75)]["fraction_actual"]) == pytest.approx(0.9) and curve[("grpo", 0.75)]["off_fraction"] == "2"
    assert any(w.startswith("ppo (arithmetic)") and "too coarse" in w for w in res["compute"]["warnings"])
    assert not any(w.startswith("grpo") for w in res["compute"]["warnings"])
    diffs = {float(r["fraction"]): r for r in csv.DictReader(open(out / "curve_diffs.csv"))}
    assert float(diffs[0.5]["fraction_actual"]) == pytest.approx(0.6)
    assert float(diffs[0.5]["baseline_fraction_actual"]) == pytest.approx(0.54)
    md = (out / "report.md").read_text()
    assert "too coarse" in md and "at@0.25" in md and "more than half a step's cost" in md


def test_a_regressed_run_is_flagged(tmp_path):
    root, runs = _small_suite(tmp_path, "reg", "[grpo, rloo]", set_='set: ["eval.every=1"]')
    for name, c in runs:
        cfg = c.to_dict()
        fall = name == "grpo-arithmetic-s1"  # climbs to 0.63, falls to 0.48 (2 SE at n = 100 is ~0.10)
        accs = [(0, 0.0, 0.49), (2, 0.5, 0.63 if fall else 0.6), (4, 1.0, 0.48 if fall else 0.62)]
        _run(root, cfg, accs, correct_seed=c.run.seed)
    res = report.build([root], tmp_path / "rep")
    flagged = dict(zip(res["summary"]["run"], res["summary"]["regressed"]))
    assert flagged == {"grpo-arithmetic-s0": False, "grpo-arithmetic-s1": True, "rloo-arithmetic-s0": False,
                       "rloo-arithmetic-s1": False}
    md = (tmp_path / "rep" / "report.md").read_text()
    answer = md.split("## The answer", 1)[1].split("\n## ", 1)[0]
    assert "Regressed runs" in answer and "grpo-arithmetic-s1" in answer


def test_generalisation_gap_and_split_tests_against_a_hand_computation(tmp_path):
    """A fake suite of grpo vs sft, 3 seeds, with two ood splits: the gap table is the hand-computed
    gain(test) − mean gain(ood), and the per-split tests are scipy's paired t-tests."""
    root, runs = _small_suite(tmp_path, "ood", "[grpo, sft]", "[0, 1, 2]")
    # (test, ood_a, ood_b) accuracies: before training (all runs) and after, per algorithm and seed
    before = (0.5, 0.3, 0.4)
    after = {"grpo": [(0.8, 0.5, 0.6), (0.7, 0.45, 0.5), (0.75, 0.5, 0.55)],
             "sft": [(0.9, 0.3, 0.4), (0.85, 0.35, 0.45), (0.8, 0.3, 0.35)]}
    for name, c in runs:
        cfg = c.to_dict()
        algo, seed = cfg["algorithm"]["name"], cfg["run"]["seed"]
        d = _run(root, cfg, [(0, 0.0, before[0]), (4, 1.0, after[algo][seed][0])], correct_seed=seed)
        lines = [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()]
        for e, accs in zip(lines, [before, after[algo][seed]]):
            e["splits"] = {"ood_a": {"accuracy": accs[1], "n": 100}, "ood_b": {"accuracy": accs[2], "n": 100}}
        (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    out = tmp_path / "rep"
    r = _cli("report", str(root), "--out", str(out), "--baseline", "grpo")
    assert r.returncode == 0, r.stderr
    gaps = {g["algorithm"]: g for g in csv.DictReader(open(out / "generalisation.csv"))}
    for algo in ("grpo", "sft"):
        per_seed = [(a[0] - before[0]) - ((a[1] - before[1]) + (a[2] - before[2])) / 2 for a in after[algo]]
        lo, hi = sps.t.interval(0.95, 2, loc=np.mean(per_seed), scale=sps.sem(per_seed))
        g = gaps[algo]
        assert float(g["gap_mean"]) == pytest.approx(np.mean(per_seed))
        assert (float(g["gap_ci_low"]), float(g["gap_ci_high"])) == (pytest.approx(lo), pytest.approx(hi))
        assert g["seeds"] == "3" and g["ci_method"] == "t"
    assert float(gaps["sft"]["gap_mean"]) > float(gaps["grpo"]["gap_mean"])  # sft kept less of its gain
    tests = {(t["split"], t["algorithm"]): t for t in csv.DictReader(open(out / "split_tests.csv"))}
    assert set(tests) == {("test", "sft"), ("ood_a", "sft"), ("ood_b", "sft")}
    for i, split in enumerate(("test", "ood_a", "ood_b")):
        p = sps.ttest_rel([a[i] for a in after["sft"]], [a[i] for a in after["grpo"]]).pvalue
        assert float(tests[(split, "sft")]["t_test_p"]) == pytest.approx(p)
    rows = {(s["algorithm"], s["split"]): s for s in csv.DictReader(open(out / "splits.csv"))}
    assert float(rows[("sft", "ood_a")]["accuracy_after_mean"]) == pytest.approx(np.mean([0.3, 0.35, 0.3]))
    md = (out / "report.md").read_text()
    assert "## Out of distribution" in md and "`ood_a` (arithmetic), sft − grpo over 3 seeds: grpo ahead by 0.167" in md
    assert (out / "plots" / "accuracy_by_split.png").stat().st_size > 5000 and "plots/accuracy_by_split.png" in md


def test_the_answer_carries_the_infrastructure_caveat_where_the_runs_differ(tmp_path):
    root, runs = _small_suite(tmp_path, "infra", "[grpo, rloo]", "[0, 1]")
    for name, c in runs:
        cfg = c.to_dict()
        d = _run(root, cfg, [(0, 0.0, 0.5), (4, 1.0, 0.6 + 0.05 * cfg["run"]["seed"])], correct_seed=cfg["run"]["seed"])
        man = json.loads((d / "manifest.json").read_text())
        man["git_revision"] = "b" * 40 if name == "rloo-arithmetic-s1" else "a" * 40
        (d / "manifest.json").write_text(json.dumps(man))
    out = tmp_path / "rep"
    assert _cli("report", str(root), "--out", str(out)).returncode == 0
    md = (out / "report.md").read_text()
    answer = md.split("## The answer", 1)[1].split("\n## ", 1)[0]
    assert "Caveat: 1 of these comparisons differ in more than the algorithm and seed (manifest.git_revision)" in answer


def test_what_a_suite_variant_sets_is_the_comparison_not_an_infrastructure_flag(tmp_path):
    root, runs = _suite_dir(tmp_path, f"""
name: lag
base: {ROOT / "configs" / "smoke.yaml"}
matrix:
  algorithm: [grpo]
  variant: [{{label: k0, set: ["rollout.off_policy_steps=0"]}}, {{label: k1, set: ["rollout.off_policy_steps=1"]}}]
  seed: [0, 1]
""")
    spec = {"name": "lag", "path": str(tmp_path / "s.yaml"), "matrix": {"variant": [
        {"label": "k0", "set": ["rollout.off_policy_steps=0"]}, {"label": "k1", "set": ["rollout.off_policy_steps=1"]}]}}
    (root / "suite.json").write_text(json.dumps(spec))
    for name, c in runs:
        cfg = c.to_dict()
        if name == "grpo-arithmetic-k1-s1":
            cfg["rollout"]["top_p"] = 0.9  # not what the variant sets: a real difference
        _run(root, cfg, [(0, 0.0, 0.5), (4, 1.0, 0.6)], correct_seed=cfg["run"]["seed"])
    out = tmp_path / "rep"
    r = _cli("report", str(root), "--out", str(out), "--baseline", "grpo-k0")
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    flags = md.split("## Identical infrastructure", 1)[1].split("\n## ", 1)[0]
    assert "config.rollout.top_p" in flags and "off_policy_steps" not in flags
    assert "Caveat: 1 of these comparisons" in md


def test_multi_turn_runs_get_their_trajectory_table_by_hand(tmp_path):
    """A fake multi-turn suite (grpo, rloo; 2 seeds): turns and tool calls averaged over steps then
    seeds, errors and template drift summed, solved-within-k-attempts averaged over seeds with a
    run that made fewer attempts carried forward."""
    root, runs = _small_suite(tmp_path, "turns", "[grpo, rloo]")
    env = {  # per run: per-step (turns, tool calls, env errors, drift), final solved_by_attempt
        "grpo-arithmetic-s0": ([(3.0, 0.0, 0, 0), (2.0, 0.0, 1, 0)], [0.5, 0.7, 0.8]),
        "grpo-arithmetic-s1": ([(2.5, 0.0, 0, 0), (2.0, 0.0, 0, 0)], [0.6, 0.9]),
        "rloo-arithmetic-s0": ([(3.0, 1.0, 0, 2), (3.0, 0.5, 0, 0)], [0.4, 0.5, 0.6]),
        "rloo-arithmetic-s1": ([(2.0, 1.0, 2, 0), (1.0, 0.0, 0, 0)], [0.5, 0.55, 0.6]),
    }
    for name, c in runs:
        cfg = c.to_dict()
        d = _run(root, cfg, [(0, 0.0, 0.5), (2, 1.0, 0.6)], correct_seed=cfg["run"]["seed"])
        steps, solved = env[name]
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": i + 1, "kl": 0.0, "reward/mean": 0.5, "env/turns_mean": t, "env/tool_calls_mean": tc,
             "env/errors": float(e), "env/tool_errors": 0.0, "env/template_drift": float(dr),
             "env/drift_frac": 0.25 * (dr > 0)}) + "\n"
            for i, (t, tc, e, dr) in enumerate(steps)))
        lines = [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()]
        lines[-1]["solved_by_attempt"] = solved
        (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    out = tmp_path / "rep"
    assert _cli("report", str(root), "--out", str(out)).returncode == 0
    rows = {r["algorithm"]: r for r in csv.DictReader(open(out / "environment.csv"))}
    g, r = rows["grpo"], rows["rloo"]
    assert float(g["turns_mean"]) == pytest.approx(np.mean([2.5, 2.25])) and float(r["turns_mean"]) == pytest.approx(2.25)
    assert float(r["tool_calls_mean"]) == pytest.approx(np.mean([0.75, 0.5]))
    assert float(g["env_errors"]) == 1 and float(r["env_errors"]) == 2 and float(r["template_drift"]) == 2
    assert float(g["drift_frac_mean"]) == 0 and float(r["drift_frac_mean"]) == pytest.approx(0.25 / 2 / 2)
    # grpo seed 1 solved everything it would within 2 attempts: its 0.9 stands for the third too
    assert [float(g[f"solved_by_attempt_{k}"]) for k in (1, 2, 3)] == pytest.approx([0.55, 0.8, 0.85])
    assert [float(r[f"solved_by_attempt_{k}"]) for k in (1, 2, 3)] == pytest.approx([0.45, 0.525, 0.6])
    assert "## Multi-turn trajectories" in (out / "report.md").read_text()
    single = tmp_path / "single"  # runs without an environment get no such section
    single.mkdir()
    root2, runs2 = _small_suite(single, "plain", "[grpo]")
    for name, c in runs2:
        _run(root2, c.to_dict(), [(0, 0.0, 0.5), (2, 1.0, 0.6)])
    assert _cli("report", str(root2), "--out", str(single / "rep")).returncode == 0
    assert not (single / "rep" / "environment.csv").exists()
    assert "Multi-turn" not in (single / "rep" / "report.md").read_text()
