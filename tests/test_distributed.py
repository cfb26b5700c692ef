"""Data parallel: 2 CPU processes under ``accelerate launch`` (gloo) against 1 process on the
same global batch. Batch-invariant sampling makes both runs draw the same completions, so the
loss, the gradient norm and the weights must agree; a checkpoint from 2 processes resumes in 1."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlbench import rundir
from rlbench.suites import jobs

from conftest import TINY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUN = {**TINY, "run": {"name": "d", "seed": 1},
       "model": {"name": "tiny-random", "tiny_init_std": 0.3},
       "task": {"name": "first_char"},
       "rollout": {"prompts_per_step": 4, "group_size": 4, "max_tokens": 4, "batch_invariant_sampling": True},
       "algorithm": {"name": "grpo", "beta": 0.05},
       "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 0.5, "checkpoint_every": 1,
                 "keep_checkpoints": 3, "micro_batch_size": 4},
       "eval": {"n": 6, "max_tokens": 4, "before": True, "after": True}}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "RLBENCH_PLUGINS": "rlbench_testing_plugins",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=900).returncode
    assert rc == 0, log.read_text()[-4000:]


def _launch_2(args: list[str], log: Path) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    _run([str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "multi-process-cpu.yaml"),
          "--main_process_port", str(jobs.free_port()),  # another test file's launch may hold 29500 (pytest-xdist)
          "-m", "rlbench.cli", "run", *args], log)


def _close(a: float, b: float, rel: float = 2e-5, abs_: float = 1e-7) -> bool:
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    cfg = tmp / "run.yaml"
    cfg.write_text(yaml.safe_dump(RUN))
    _run([sys.executable, "-m", "rlbench.cli", "run", str(cfg), "--out", str(tmp / "one")], tmp / "one.log")
    _launch_2([str(cfg), "--out", str(tmp / "two")], tmp / "two.log")
    return tmp


def test_two_processes_train_on_the_global_batch_like_one(runs):
    one = rundir.read_jsonl(runs / "one" / "d" / "metrics.jsonl")
    two = rundir.read_jsonl(runs / "two" / "d" / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2, 3]  # rank 0 alone writes: no duplicate lines
    assert all(m["dist/world_size"] == 2.0 for m in two)
    # replicas hold identical weights after every step
    assert all(m["dist/param_checksum_spread"] == 0.0 for m in two), [m["dist/param_checksum_spread"] for m in two]
    # the same completions (batch-invariant sampling) …
    for a, b in zip(one, two):
        for k in ["reward/mean", "reward/std", "reward/accuracy", "completion_len/mean", "tokens/generated_total", "lr"]:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])  # lr: one schedule step per update, not one per rank
    assert len({m["reward/accuracy"] for m in one}) > 1 or one[0]["reward/std"] > 0  # a batch with signal
    # … so the loss (normalised over the global batch, not per rank), gradient norm and KL agree
    for a, b in zip(one, two):
        for k in ["loss", "grad_norm", "kl", "entropy"]:
            assert _close(a[k], b[k]), (a["step"], k, a[k], b[k])
    assert one[0]["grad_norm"] > 0
    # evaluation is sharded over ranks and gathered: the same record as one process
    e1, e2 = (rundir.read_jsonl(runs / r / "d" / "eval.jsonl") for r in ("one", "two"))
    assert [e["step"] for e in e2] == [0, 3]
    for a, b in zip(e1, e2):
        assert a["ids"] == b["ids"] and a["correct"] == b["correct"] and a["n"] == b["n"] == 6
        assert _close(a["kl"], b["kl"], rel=1e-4, abs_=1e-6)
    cost = yaml.safe_load((runs / "two" / "d" / "cost.json").read_text())
    assert cost["tokens_generated"] == yaml.safe_load((runs / "one" / "d" / "cost.json").read_text())["tokens_generated"]
    assert yaml.safe_load((runs / "two" / "d" / "manifest.json").read_text())["world_size"] == 2


def test_final_weights_match_one_process(runs):
    import torch
    from safetensors.torch import load_file

    a = load_file(str(runs / "one" / "d" / "checkpoints" / "step_000003" / "model.safetensors"))
    b = load_file(str(runs / "two" / "d" / "checkpoints" / "step_000003" / "model.safetensors"))
    moved = load_file(str(runs / "one" / "d" / "checkpoints" / "step_000001" / "model.safetensors"))
    assert max((a[k] - moved[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert all(torch.isfinite(v).all() for v in b.values())


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    resumed = tmp_path / "d"
    shutil.copytree(runs / "two" / "d", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000003")
    (resumed / "cost.json").unlink()
    _run([sys.executable, "-m", "rlbench.cli", "run", "--resume", str(resumed)], tmp_path / "resume.log")
    one = rundir.read_jsonl(runs / "one" / "d" / "metrics.jsonl")
    again = rundir.read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in again] == [1, 2, 3]
    assert "dist/world_size" not in again[-1]  # step 3 ran in one process
    for k in ["reward/mean", "completion_len/mean"]:
        assert again[-1][k] == one[-1][k]
    for k in ["loss", "grad_norm", "kl"]:
        assert _close(again[-1][k], one[-1][k]), (k, again[-1][k], one[-1][k])


def _whitened(rewards: list[float], lengths: list[int]) -> list[list[float]]:
    """REINFORCE++'s advantages with β = 0, computed independently: every real token of a
    completion has its reward as return; (x − mean) / sqrt(var + 1e-8) over the tokens, population var."""
    tokens = [r for r, n in zip(rewards, lengths) for _ in range(int(n))]
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / len(tokens)
    return [[(r - mean) / (var + 1e-8) ** 0.5] * int(n) for r, n in zip(rewards, lengths)]


def test_batch_statistics_in_prepare_are_per_rank(tmp_path):
    """The hookspec says prepare() sees one rank's shard: REINFORCE++'s whitening at 2 processes
    is over each rank's tokens, not the global batch's (as verl, whose whitening runs per worker)."""
    raw = {**RUN, "run": {"name": "w", "seed": 3}, "train": {**RUN["train"], "steps": 3, "checkpoint_every": 0},
           "eval": {**RUN["eval"], "before": False, "after": False},
           "rollout": {**RUN["rollout"], "prompts_per_step": 8, "group_size": 1}}
    records = {}
    for procs in (1, 2):
        raw["algorithm"] = {"name": "recording_reinforce_pp", "beta": 0.0, "record_file": str(tmp_path / f"rec{procs}")}
        cfg = tmp_path / f"run{procs}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        args = [str(cfg), "--out", str(tmp_path / f"out{procs}")]
        if procs == 1:
            _run([sys.executable, "-m", "rlbench.cli", "run", *args], tmp_path / "one.log")
        else:
            _launch_2(args, tmp_path / "two.log")
        records[procs] = [rundir.read_jsonl(tmp_path / f"rec{procs}.rank{r}") for r in range(procs)]
    one, (rank0, rank1) = records[1][0], records[2]
    assert [r["step"] for r in one] == [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2, 3]
    for shard in one + rank0 + rank1:  # every process whitened over exactly the rows it saw, every step
        want = _whitened(shard["rewards"], shard["lengths"])
        assert all(x == pytest.approx(y, abs=1e-5) for row, wrow in zip(shard["advantages"], want)
                   for x, y in zip(row, wrow))
    # step 1 (the same initial weights): the same completions (batch-invariant sampling), split in two shards …
    g, a, b = one[0], rank0[0], rank1[0]
    assert a["ids"] + b["ids"] == g["ids"] and a["rewards"] + b["rewards"] == g["rewards"]
    assert a["lengths"] + b["lengths"] == g["lengths"]
    # … whose statistics are not the global batch's, so rank 0's advantages differ from one process's
    assert a["rewards"] != b["rewards"]
    assert any(abs(x - y) > 1e-3 for row, grow in zip(a["advantages"], g["advantages"]) for x, y in zip(row, grow))


def test_two_multi_process_runs_side_by_side_each_get_their_own_main_port(tmp_path):
    """The local executor with jobs: 2 and processes: 2 starts two accelerate launches at once:
    they must not both rendezvous on accelerate's default main port (29500), where one run's
    ranks could meet the other run's store; each launch gets a free port of its own."""
    spec = tmp_path / "pair.yaml"
    spec.write_text(f"name: pair\nbase: {ROOT / 'configs/smoke.yaml'}\nbudget: {{steps: 2}}\n"
                    "matrix: {algorithm: [grpo, rloo], task: [first_char], seed: [0]}\n"
                    'set: ["rollout.max_tokens=4", "eval.n=4", "eval.max_tokens=4", "eval.before=false", '
                    '"logging.loggers=[]"]\nprobe: false\nexecutor: {name: local, jobs: 2, processes: 2}\n')
    r = subprocess.run([sys.executable, "-m", "rlbench.cli", "suite", "run", str(spec), "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("grpo-first_char-s0", "rloo-first_char-s0"):
        metrics = rundir.read_jsonl(tmp_path / "pair" / "runs" / name / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2] and all(m["dist/world_size"] == 2.0 for m in metrics)
    logs = [(tmp_path / "pair" / "logs" / f"{n}.log").read_text() for n in ("grpo-first_char-s0", "rloo-first_char-s0")]
    ports = [log.split("--main_process_port ")[1].split()[0] for log in logs]
    assert ports[0] != ports[1]
