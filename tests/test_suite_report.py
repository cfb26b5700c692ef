"""Suites and reports: the smoke suite end to end, the report's tables and HTML in a real browser,
a suite killed mid-run and restarted, statistics by hand, the aha-moment detector."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlbench import rundir
from rlbench.reporting import report
from rlbench.suites import suite
from rlbench.reporting.stats import interval, iqm, mcnemar_exact, prob_improvement

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["suite", "algorithm", "task", "model", "seed", "steps", "accuracy_before", "accuracy_after",
           "accuracy_delta", "kl_final", "reward_final", "tokens_generated", "wall_seconds", "device_hours", "cost_usd",
           "peak_memory_gb"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "rlbench.cli", *args], cwd=ROOT, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suites")
    # two runs at a time: each is a process of its own, mostly start-up on this 2-core machine
    r = _cli("suite", "run", "configs/suites/smoke.yaml", "--out", str(out), "--jobs", "2", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "smoke"


def test_smoke_suite_and_report(smoke, tmp_path):
    runs = suite.expand(suite.load(ROOT / "configs/suites/smoke.yaml"))
    assert len(runs) == 18 and {json.loads(json.dumps(c.to_dict()))["algorithm"]["name"] for _, c in runs} == {
        "grpo", "ppo", "dpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "cispo"}
    status = json.loads((smoke / "status.json").read_text())["runs"]
    assert len(status) == 18 and all(v["status"] == "complete" for v in status.values())

    out = tmp_path / "report"
    r = _cli("report", str(smoke), "--out", str(out), "--mde", "0.05")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert set(COLUMNS) <= set(rows[0]) and len(rows) == 18
    assert {r["run"] for r in rows} == set(status) and all(r["suite"] == "smoke" for r in rows)
    assert all(int(r["steps"]) >= 1 and r["stopped_by"] == "flop_budget" and float(r["tokens_generated"]) > 0
               for r in rows)
    agg = list(csv.DictReader(open(out / "aggregate.csv")))
    assert len(agg) == 9
    for a in agg:  # a mean and a 95% interval around it, over the 2 seeds
        assert float(a["accuracy_after_ci_low"]) <= float(a["accuracy_after_mean"]) <= float(a["accuracy_after_ci_high"])
    md = (out / "report.md").read_text()
    assert "## Problem-level tests against `grpo`" in md and "differs only in the algorithm section" in md
    # power: a paired t-test per algorithm on the per-seed final accuracies, recomputed here from summary.csv
    from scipy import stats

    power = list(csv.DictReader(open(out / "power.csv")))
    assert {p["algorithm"] for p in power} == {a["algorithm"] for a in agg} - {"grpo"}
    acc = {(r["algorithm"], r["seed"]): float(r["accuracy_after"]) for r in rows}
    for p in power:
        mine = [acc[(p["algorithm"], s)] for s in ("0", "1")]
        base = [acc[("grpo", s)] for s in ("0", "1")]
        assert int(p["paired_seeds"]) == 2 and float(p["mean_diff"]) == pytest.approx((mine[0] + mine[1] - base[0] - base[1]) / 2)
        if len({a - b for a, b in zip(mine, base)}) == 2:  # the two differences differ: a t-test exists
            assert float(p["t_test_p"]) == pytest.approx(stats.ttest_rel(mine, base).pvalue)
            assert float(p["seeds_for_0.05_low"]) <= float(p["seeds_for_0.05"]) <= float(p["seeds_for_0.05_high"])
    # the task's learnability probe, run once before the runs, is shown beside the results
    probe = json.loads((smoke / "probes" / "arithmetic.json").read_text())
    groups = probe["group_rewards"]
    assert probe["uniform_groups"] == pytest.approx(sum(len(set(g)) == 1 for g in groups) / len(groups))
    assert "## Learnability probe" in md and probe["verdict"].split(":")[0] in md
    answer = md.split("## The answer", 1)[1].split("##", 1)[0]
    assert md.index("## The answer") < md.index("## Per algorithm and task") and "Against `grpo`" in answer
    assert "--mde 0.05" in md.split("```bash")[1]
    assert "rlbench report" in md.split("```bash")[1]  # the command that regenerates it
    for plot, label in (("reward_mean_vs_step.png", "reward"), ("kl_vs_step.png", "KL to reference (per token)"),
                        ("completion_len_mean_vs_step.png", "completion length (tokens)"), ("accuracy_vs_cost.png", None)):
        # drawn, or (a metric that is 0 in every run at every step) said in one sentence instead
        assert (out / "plots" / plot).is_file() and (out / "plots" / plot).stat().st_size > 5000 or \
            f"- {label}: 0 in every run at every step (not drawn)." in md, plot

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None and not os.environ.get("RLBENCH_REQUIRE_BROWSER"):
        pytest.skip("no headless Chromium (apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}"]
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--window-size=1400,900", "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    n_images = len(list((out / "plots").glob("*.png")))
    assert f'data-images-loaded="{n_images}:true"' in dom  # every plot decoded in the browser
    # the verdict first: the answer box and the first plot start inside the first 1400 x 900 viewport
    import re

    verdict = [int(x) for x in re.search(r'data-verdict="(-?\d+):(-?\d+)"', dom).groups()]
    hero = [int(x) for x in re.search(r'data-hero="(-?\d+):(-?\d+)"', dom).groups()]
    assert 0 <= verdict[0] < verdict[1] <= hero[0] < 900, (verdict, hero)
    text = re.sub(r"<(pre|code)>.*?</\1>", "", re.sub(r"<script.*?</script>", "", dom, flags=re.S), flags=re.S)
    assert "`" not in re.sub(r"<[^>]+>", "", text)  # markdown was rendered: no raw backticks
    assert "<p>- " not in dom and "<li>" in dom  # bullets are a list
    regenerate = re.search(r"<pre><code[^>]*>(.*?)</code></pre>", dom, re.S).group(1).strip().splitlines()
    assert regenerate[0].startswith("rlbench suite run") and regenerate[1].startswith("rlbench report")
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1400,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    assert shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")


def test_smoke_suite_under_a_flop_budget(smoke, tmp_path):
    """Every algorithm stops after the step that reaches the suite's FLOP budget: its FLOPs lie in
    [budget, budget + its costliest step), so any two runs lie within one step's cost of each other;
    the count is recomputed from the counters by hand (PPO's critic and the reference included)."""
    budget = float(suite.load(ROOT / "configs/suites/smoke.yaml")["budget"]["flops"])
    spent, step_cost = {}, {}
    for d in sorted((smoke / "runs").iterdir()):
        cost = json.loads((d / "cost.json").read_text())
        N, Nc = cost["params"], cost["params_critic"]
        by_hand = (2 * N * (cost["tokens_prompt"] + cost["tokens_generated"] + cost["tokens_reference"]
                            + cost["tokens_old_logprobs"]) + 6 * (N + Nc) * cost["tokens_trained"]
                   + 2 * Nc * cost["tokens_critic"])
        assert cost["flops_estimate"] == pytest.approx(by_hand) and cost["stopped_by"] == "flop_budget"
        assert cost["budget"] == {"flops": budget} and cost["tokens_prompt"] > 0 and cost["tokens_reference"] > 0
        if d.name.startswith("ppo"):  # the critic's value pass and its training are counted
            assert Nc > 0 and cost["tokens_critic"] > 0
        totals = [m["spent/flops"] for m in rundir.read_jsonl(d / "metrics.jsonl")]
        steps = [b - a for a, b in zip([0.0] + totals[:-1], totals)]
        assert totals[-1] == pytest.approx(cost["flops_estimate"])
        assert totals[-2] < budget <= totals[-1] < budget + max(steps)  # stopped after the step that reached it
        spent[d.name], step_cost[d.name] = totals[-1], max(steps)
        # evals where the spent share first reached 0, 0.25, 0.5 and at the end
        evals = rundir.read_jsonl(d / "eval.jsonl")
        tagged = {f: e for e in evals for f in e.get("budget_fractions", [])}
        assert sorted(tagged) == [0.0, 0.25, 0.5, 1.0]
        for f, e in tagged.items():
            assert e["spent"]["flops"] >= f * budget
            earlier = [t for t in totals if t < e["spent"]["flops"]]
            assert f == 0 or not earlier or earlier[-1] < f * budget  # the first step at or past the fraction
    assert {n.split("-")[0] for n in spent} >= {"ppo", "dpo", "grpo"}
    for a in spent:
        for b in spent:
            assert abs(spent[a] - spent[b]) < max(step_cost[a], step_cost[b])

    out = tmp_path / "report"
    assert _cli("report", str(smoke), "--out", str(out), "--x", "tokens").returncode == 0
    curve = list(csv.DictReader(open(out / "curves.csv")))
    grpo = [r for r in curve if r["algorithm"] == "grpo"]
    assert [float(r["fraction"]) for r in grpo] == [0.0, 0.25, 0.5, 1.0] and all(r["seeds"] == "2" for r in grpo)
    assert float(grpo[0]["tokens"]) == 0 and float(grpo[-1]["tokens"]) > float(grpo[1]["tokens"])
    # every fraction is matched to the run's evaluation nearest to it; its actual share is shown, and an
    # algorithm whose runs took fewer steps than there are fractions is warned about
    actual = {}
    for d in sorted((smoke / "runs").iterdir()):
        evals = [e for e in rundir.read_jsonl(d / "eval.jsonl") if "budget_fraction" in e]
        algo = d.name.split("-")[0]
        for f in (0.0, 0.25, 0.5, 1.0):
            actual.setdefault((algo, f), []).append(min(evals, key=lambda e: (abs(e["budget_fraction"] - f), e["step"]))
                                                    ["budget_fraction"])
    for r in curve:
        assert float(r["fraction_actual"]) == pytest.approx(sum(actual[(r["algorithm"], float(r["fraction"]))]) / 2)
    steps = {}
    for d in sorted((smoke / "runs").iterdir()):
        steps.setdefault(d.name.split("-")[0], []).append(len(rundir.read_jsonl(d / "metrics.jsonl")))
    md = (out / "report.md").read_text()
    for algo, n in steps.items():
        assert (f"**Warning:** {algo} (arithmetic): its runs took" in md) == (min(n) < 3), (algo, n)
    assert "## Accuracy against compute" in md and "not identifiable" in md  # a random model's flat curves
    assert (out / "plots" / "accuracy_vs_tokens.png").stat().st_size > 5000
    assert "Determinism tier" in md and "bitwise: 18" in md and "batch-invariant sampling on in every run" in md


def test_identical_infrastructure_flags_other_differences(smoke, tmp_path):
    a = report.load_run(smoke / "runs" / "grpo-arithmetic-s0")
    b = report.load_run(smoke / "runs" / "ppo-arithmetic-s0")
    assert report.infra_differences(a, b) == []
    b["config"]["rollout"]["temperature"] = 0.5
    b["manifest"]["versions"]["torch"] = "0.0"
    b["manifest"]["accelerator"] = "NVIDIA A100-SXM4-80GB"  # a run placed on another GPU type
    diffs = report.infra_differences(a, b)
    assert any(d.startswith("config.rollout.temperature") for d in diffs)
    assert any(d.startswith("manifest.versions.torch") for d in diffs)
    assert any(d.startswith("manifest.accelerator") and "A100" in d for d in diffs)


def test_killed_suite_resumes_without_redoing_finished_runs(tmp_path):
    spec = tmp_path / "kill.yaml"
    spec.write_text(f"""name: kill
base: {ROOT / 'configs/smoke.yaml'}
budget: {{steps: 6}}
probe: false
matrix: {{algorithm: [grpo, rloo], seed: [0]}}
set: ["rollout.max_tokens=8", "eval.n=8", "eval.max_tokens=8", "train.checkpoint_every=1", "logging.loggers=[]"]
""")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rlbench.cli", "suite", "run", str(spec), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = out / "kill"
    deadline = time.time() + 600
    # wait until the first run is complete and the second has written a checkpoint, then kill everything
    while time.time() < deadline:
        st = json.loads((root / "status.json").read_text())["runs"] if (root / "status.json").exists() else {}
        second = root / "runs" / "rloo-arithmetic-s0" / "checkpoints"
        if st.get("grpo-arithmetic-s0", {}).get("status") == "complete" and any(second.glob("step_*/state.json")):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = root / "runs" / "grpo-arithmetic-s0" / "metrics.jsonl"
    mtime, lines = first.stat().st_mtime_ns, first.read_text()
    assert not suite.is_complete(root / "runs" / "rloo-arithmetic-s0")

    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert first.stat().st_mtime_ns == mtime and first.read_text() == lines  # not redone
    st = json.loads((root / "status.json").read_text())["runs"]
    assert st["grpo-arithmetic-s0"]["attempts"] == 1
    ckpts = sorted(p.name for p in (root / "runs" / "grpo-arithmetic-s0" / "checkpoints").iterdir())
    assert ckpts == ["step_000006"]  # a complete run keeps its newest checkpoint only
    assert st["rloo-arithmetic-s0"]["status"] == "complete" and st["rloo-arithmetic-s0"]["how"] == "resumed"
    steps = [m["step"] for m in rundir.read_jsonl(root / "runs" / "rloo-arithmetic-s0" / "metrics.jsonl")]
    assert steps == list(range(1, 7))  # resumed from its checkpoint: every step once


def test_a_failing_run_is_recorded_and_the_suite_goes_on(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"""name: bad
base: {ROOT / 'configs/smoke.yaml'}
budget: {{steps: 1}}
probe: false
matrix: {{algorithm: [grpo], task: [arithmetic, {{name: gsm8k, test_file: {tmp_path / 'broken.jsonl'}}}]}}
set: ["rollout.max_tokens=4", "eval.n=4", "eval.max_tokens=4", "logging.loggers=[]"]
""")
    (tmp_path / "broken.jsonl").write_text('{"question": "1+1?"}\n')  # no answer: the gsm8k run must fail
    r = _cli("suite", "run", str(spec), "--out", str(tmp_path / "out"), timeout=600)
    assert r.returncode == 1
    st = json.loads((tmp_path / "out" / "bad" / "status.json").read_text())["runs"]
    assert st["grpo-arithmetic-s0"]["status"] == "complete"
    bad = next(v for k, v in st.items() if "gsm8k" in k)
    assert bad["status"] == "failed" and "missing answer" in bad["error"]
    s = _cli("suite", "status", str(tmp_path / "out" / "bad"))
    assert "1 complete, 1 failed" in s.stdout


def test_statistics_by_hand():
    assert iqm([1, 2, 3, 4, 100, 5, 6, 7]) == pytest.approx((3 + 4 + 5 + 6) / 4)  # cut 2 from each end
    assert prob_improvement([0.5, 0.7], [0.6]) == 0.5 and prob_improvement([0.6], [0.6]) == 0.5
    iv = interval([0.2, 0.4, 0.6])  # Student t at 3 values: mean ± t(0.975, 2) · 0.2 / √3
    assert iv["method"] == "t" and iv["high"] - 0.4 == pytest.approx(4.302653 * 0.2 / 3 ** 0.5, rel=1e-5)
    # McNemar exact: b = 8, c = 2 → 2 · P(Bin(10, ½) ≤ 2) = 2 · 56 / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(2 * 56 / 1024) and mcnemar_exact(0, 0) == 1.0


def test_token_budget_stops_a_run(tmp_path):
    from conftest import tiny_config
    from rlbench.training.trainer import start

    cfg = tiny_config("train.steps=50", "train.max_generated_tokens=100", "rollout.max_tokens=8", "eval.kl=false",
                      algorithm={"name": "dapo", "dynamic_sampling": 2})
    start(cfg, tmp_path / "b").run()
    cost = json.loads((tmp_path / "b" / "cost.json").read_text())
    assert cost["stopped_by"] == "token_budget" and 100 <= cost["tokens_generated"] < 100 + 3 * 16 * 8
    steps = rundir.read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert steps[-1]["tokens/generated_total"] == cost["tokens_generated"] and len(steps) < 50


def test_aha_detector(tmp_path, first_char_task):
    from conftest import tiny_config
    from rlbench.plugins.hooks import aha
    from rlbench.training.trainer import start

    assert aha.find("Hmm, wait. Let me check that again.", ("wait",)).group(0) == "wait"
    assert aha.find("the waiter came", ("wait",)) is None  # whole words only
    cfg = tiny_config("train.steps=2", "eval.kl=false", "rollout.max_tokens=4",
                      logging={"loggers": [], "progress": False}, hooks={"aha": {"phrases": ["a", "the", "i", "to", "of"]}})
    start(cfg, tmp_path / "aha").run()
    rates = [m["aha/rate"] for m in rundir.read_jsonl(tmp_path / "aha" / "metrics.jsonl")]
    assert len(rates) == 2 and all(0 <= r <= 1 for r in rates)
    cfg = tiny_config("train.steps=1", "eval.kl=false",
                      logging={"loggers": [], "progress": False}, hooks={"aha": {"phrases": []}})
    start(cfg, tmp_path / "off").run()
    assert "aha/rate" not in rundir.read_jsonl(tmp_path / "off" / "metrics.jsonl")[0]


def test_aha_rate_counts_phrases(tmp_path):
    from rlbench import config
    from rlbench.plugins.hooks import aha
    from rlbench.types import Prompt, Rollouts

    texts = ["2+2=5. Wait, let me check: 4.", "It is 4.", "I made an error; it is 4", "waiting room"]
    ro = Rollouts(prompts=[Prompt("p", "", None)], prompt_ids=[[1]], group=torch.zeros(4, dtype=torch.long),
                  completion_ids=torch.ones(4, 1, dtype=torch.long), completion_mask=torch.ones(4, 1),
                  sampler_logprobs=torch.zeros(4, 1), texts=texts, finish_reasons=["stop"] * 4)
    cfg = config.resolve({})
    out = aha.rlbench_on_rollouts(step=3, rollouts=ro, rewards={"accuracy": torch.tensor([1.0, 1, 0, 0])},
                                  run_dir=str(tmp_path), config=cfg)
    assert out == {"aha/rate": 0.5, "aha/rate_correct": 0.5}
    saved = rundir.read_jsonl(tmp_path / "aha.jsonl")
    assert [s["phrase"] for s in saved] == ["Wait", "I made an error"] and saved[0]["step"] == 3


def test_variants_are_a_factor_of_their_own(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
name: v
base: {ROOT / "configs" / "smoke.yaml"}
matrix:
  algorithm: [grpo, cispo]
  variant: [{{label: k0, set: []}}, {{label: k2, set: ["rollout.off_policy_steps=2", "rollout.is_correction=mask"]}}]
  seed: [3]
set: ["rollout.max_tokens=5"]
""")
    runs = dict(suite.expand(suite.load(spec)))
    assert list(runs) == ["grpo-arithmetic-k0-s3", "grpo-arithmetic-k2-s3", "cispo-arithmetic-k0-s3",
                          "cispo-arithmetic-k2-s3"]
    k2 = runs["cispo-arithmetic-k2-s3"]
    assert (k2.rollout.off_policy_steps, k2.rollout.is_correction, k2.rollout.max_tokens, k2.run.variant) == \
        (2, "mask", 5, "k2")
    assert runs["grpo-arithmetic-k0-s3"].rollout.off_policy_steps == 0
    spec.write_text(spec.read_text() + "probe: {prompts: 0}\n")
    with pytest.raises(ValueError, match="probe is false or"):
        suite.load(spec)
    spec.write_text(spec.read_text().replace("probe: {prompts: 0}\n", "").replace("{label: k0, set: []}", "{set: []}"))
    with pytest.raises(ValueError, match="each matrix.variant entry is"):
        suite.load(spec)


def test_suite_keys_get_a_did_you_mean_and_set_reaches_every_run(tmp_path):
    spec = tmp_path / "s.yaml"
    body = f"""
name: d
base: {ROOT / "configs" / "smoke.yaml"}
matrix:
  algorithm: [grpo, rloo]
  seeds: [0, 1]
"""
    spec.write_text(body)
    with pytest.raises(ValueError, match="unknown matrix key 'seeds'; did you mean 'seed'"):
        suite.load(spec)
    spec.write_text(body.replace("seeds:", "seed:") + "baselin: grpo\n")
    with pytest.raises(ValueError, match="unknown key 'baselin'; did you mean 'baseline'"):
        suite.load(spec)
    spec.write_text(body.replace("seeds:", "seed:") + 'set: ["rollout.max_tokens=5"]\n')
    loaded = suite.load(spec, ["train.lr=0.5", "rollout.max_tokens=6"])
    runs = dict(suite.expand(loaded))
    assert len(runs) == 4 and all(c.train.lr == 0.5 and c.rollout.max_tokens == 6 for c in runs.values())
    assert loaded["set"] == ["rollout.max_tokens=5", "train.lr=0.5", "rollout.max_tokens=6"]  # recorded in suite.json


def test_the_manifest_records_each_plugins_code_and_a_changed_file_is_flagged(tmp_path):
    from conftest import tiny_config
    from rlbench import manager
    from rlbench.reporting.runs import infra_differences
    from rlbench.training import trainer

    t = trainer.start(tiny_config("train.steps=1"), tmp_path / "r")
    t.close()
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    grpo = man["plugins"]["algorithm"]
    assert grpo["module"] == "rlbench.plugins.algorithms.grpo" and grpo["distribution"] == "rlbench"
    assert len(grpo["file_sha256"]) == 16 and man["plugins"]["task"]["name"] == "arithmetic"
    assert manager.provenance("algorithm", "grpo") == grpo
    cfg = json.loads(json.dumps({"task": {"name": "arithmetic"}, "run": {}}))
    a = {"config": cfg, "manifest": man}
    edited = json.loads(json.dumps(man))
    edited["plugins"]["task"]["file_sha256"] = "0" * 16
    assert infra_differences(a, a) == []
    diffs = infra_differences(a, {"config": cfg, "manifest": edited})
    assert diffs == [f"manifest.plugins.task.file_sha256: {man['plugins']['task']['file_sha256']!r} vs '{'0' * 16}'"]
    other = json.loads(json.dumps(man))
    other["plugins"]["algorithm"] = {**grpo, "name": "rloo", "file_sha256": "f" * 16}
    assert infra_differences(a, {"config": cfg, "manifest": other}) == []  # different algorithms: not compared


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["sigint", "cancel"])
def test_stopping_a_local_suite_stops_it_and_a_rerun_resumes(tmp_path, how):
    """SIGINT to the driver (Ctrl-C), or ``rlbench suite cancel``: the running run checkpoints and
    ends ``interrupted``, no new run starts, no child outlives the driver; the next suite run
    resumes the interrupted run from its checkpoint and finishes the others."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
name: stop
base: {ROOT / "configs" / "smoke.yaml"}
matrix: {{algorithm: [grpo, rloo], seed: [0]}}
set: ["train.steps=40", "train.checkpoint_every=1", "eval.before=false", "eval.n=4", "rollout.max_tokens=4",
      "logging.loggers=[]"]
probe: false
""")  # 40 steps: the run must still be going when `suite cancel` (a new process) arrives, on a loaded machine too
    out = tmp_path / "out"
    root = out / "stop"
    driver = subprocess.Popen([sys.executable, "-m", "rlbench.cli", "suite", "run", str(spec), "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"),
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(root.glob("runs/*/checkpoints/step_*/state.json")) and time.monotonic() < deadline:
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-2000:]
        time.sleep(0.5)
    status = json.loads((root / "status.json").read_text())
    running = [k for k, v in status["runs"].items() if v.get("status") == "running"]
    assert len(running) == 1
    child = int(status["runs"][running[0]]["job_id"])
    if how == "sigint":
        os.kill(driver.pid, signal.SIGINT)
    else:
        r = _cli("suite", "cancel", str(root), timeout=600)
        assert r.returncode == 0, r.stderr
    assert driver.wait(timeout=300) == 130, (tmp_path / "driver.log").read_text()[-2000:]
    assert not _alive(child)  # the run did not outlive the driver
    status = json.loads((root / "status.json").read_text())["runs"]
    assert status[running[0]]["status"] == "interrupted"
    assert "resumes it from its newest checkpoint" in status[running[0]]["error"]
    others = [k for k in status if k != running[0]]
    assert all(status[k]["status"] == "pending" and not status[k].get("job_id") for k in others)  # never started
    shown = _cli("suite", "status", str(root)).stdout
    assert "interrupted" in shown and "resumes it from its newest checkpoint" in shown
    # the next suite run resumes it (every step logged once) and runs the others
    r = _cli("suite", "run", str(spec), "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads((root / "status.json").read_text())["runs"]
    assert all(v["status"] == "complete" for v in status.values())
    assert status[running[0]]["how"] == "resumed"
