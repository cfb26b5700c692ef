"""Faults: SIGKILL / SIGTERM and resume, NaN and inf in a step, engine failures, long prompts,
unreadable checkpoints, determinism. Real training processes on tiny-random with the hf engine."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import rlbench
from rlbench import manager, rundir
from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig
from rlbench.plugins.engines.hf import HFConfig, HFEngine
from rlbench.training.trainer import Trainer, TrainingError, start
from rlbench.types import Prompt

from conftest import TINY, tiny_config
from rlbench_testing_plugins import FirstChar

# -- helpers: a training process of its own ----------------------------------------------

KILL_RUN = {**TINY, "run": {"name": "k", "seed": 3},
            "rollout": {"prompts_per_step": 4, "group_size": 4, "max_tokens": 16},
            "train": {"steps": 8, "lr": 1e-3, "checkpoint_every": 1, "keep_checkpoints": 2, "micro_batch_size": 8},
            "eval": {"n": 8, "max_tokens": 8, "before": True, "after": True, "every": 3},
            "algorithm": {"name": "grpo", "beta": 0.05}}


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "rlbench.cli", "run", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rundir.read_jsonl(run_dir / "metrics.jsonl")]


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "time"} for r in records]


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# -- crash safety ----------------------------------------------------------------------------

def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = _write_config(tmp_path / "run.yaml", KILL_RUN)
    ref = _launch([str(cfg), "--out", str(tmp_path / "ref")], tmp_path / "ref.log")
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    run_dir = tmp_path / "killed" / "k"
    ckpts = run_dir / "checkpoints"
    rng = random.Random(7)
    kills, mid_write = [], 0
    proc = _launch([str(cfg), "--out", str(tmp_path / "killed")], tmp_path / "killed.log")
    while True:
        if len(kills) < 4:
            target = "checkpoint" if len(kills) % 2 == 0 else "step"  # alternate: inside a checkpoint write, mid-step
            seen = len(_steps(run_dir))
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                if target == "checkpoint" and list(ckpts.glob(".tmp_step_*")):
                    break
                if target == "step" and len(_steps(run_dir)) > seen:
                    time.sleep(rng.uniform(0.0, 0.6))
                    break
                time.sleep(0.001)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                caught = bool(list(ckpts.glob(".tmp_step_*")))
                mid_write += caught
                kills.append((target, len(_steps(run_dir)), caught))
                proc = _launch(["--resume", str(run_dir)], tmp_path / "killed.log")
                continue
        assert proc.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]
        break
    print("kills (target, steps logged at the kill, inside a checkpoint write):", kills)
    assert len(kills) == 4, kills
    assert mid_write >= 1, f"no kill landed inside a checkpoint write: {kills}"
    # every step exactly once, and the same numbers as the run that was never interrupted
    assert _steps(run_dir) == list(range(1, 9))
    a, b = rundir.read_jsonl(tmp_path / "ref" / "k" / "metrics.jsonl"), rundir.read_jsonl(run_dir / "metrics.jsonl")
    assert _comparable(b) == _comparable(a)
    ea, eb = rundir.read_jsonl(tmp_path / "ref" / "k" / "eval.jsonl"), rundir.read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in eb] == [0, 3, 6, 8]
    assert _comparable(eb) == _comparable(ea)
    assert not list(ckpts.glob(".tmp_step_*"))
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000007", "step_000008"]
    assert (run_dir / "cost.json").is_file()


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    raw = {**KILL_RUN, "train": {**KILL_RUN["train"], "steps": 50, "checkpoint_every": 0}}
    cfg = _write_config(tmp_path / "run.yaml", raw)
    run_dir = tmp_path / "out" / "k"
    proc = _launch([str(cfg), "--out", str(tmp_path / "out")], tmp_path / "log")
    while len(_steps(run_dir)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    log = (tmp_path / "log").read_text()
    assert "SIGTERM received: stopped after step" in log and "Traceback" not in log
    done = _steps(run_dir)
    assert done == list(range(1, len(done) + 1)) and len(done) < 50
    assert (run_dir / "checkpoints" / f"step_{len(done):06d}" / "state.json").is_file()
    assert not (run_dir / "cost.json").exists()  # not complete: a suite resumes it
    # and it resumes from there
    from rlbench import config
    tr = Trainer(config.resolve(raw), run_dir, resume=True)
    assert tr.step_done == len(done)


def test_resume_falls_back_to_an_older_checkpoint_when_the_newest_is_damaged(tmp_path, capfd):
    over = ("train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3")
    start(tiny_config(*over), tmp_path / "r").run()
    ck = tmp_path / "r" / "checkpoints"
    weights = ck / "step_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # torn by a failing disk
    (ck / ".tmp_step_000004").mkdir()  # an interrupted write
    tr = Trainer(tiny_config(*over, "train.steps=4"), tmp_path / "r", resume=True)
    assert tr.step_done == 2
    assert "step_000003" in capfd.readouterr().err
    assert not (ck / ".tmp_step_000004").exists()
    assert _steps(tmp_path / "r") == [1, 2]
    tr.run()
    assert _steps(tmp_path / "r") == [1, 2, 3, 4]


def test_a_torn_metrics_line_never_swallows_the_next_record(tmp_path):
    path = tmp_path / "m.jsonl"
    rundir.append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "loss": 0.')  # the process died mid-write
    rundir.append_jsonl(path, {"step": 2})
    assert [r["step"] for r in rundir.read_jsonl(path)] == [1, 2]


# -- numerical faults ------------------------------------------------------------------------

@dataclass
class FaultyConfig(GRPOConfig):
    nan_steps: list = field(default_factory=list)  # the loss is NaN on these steps
    inf_grad_steps: list = field(default_factory=list)  # the loss is finite, its gradient not


class FaultyGRPO(GRPO):
    Config = FaultyConfig

    def loss(self, logp, batch, ctx):
        loss, metrics = super().loss(logp, batch, ctx)
        if ctx.step in self.config.nan_steps:
            loss = loss * float("nan")
        if ctx.step in self.config.inf_grad_steps:  # d sqrt(s)/ds at 0 is inf: 0 * inf = NaN gradients
            loss = loss + 0.0 * torch.sqrt((logp * 0).sum())
        return loss, metrics


@dataclass
class NaNRewardConfig:
    nan_calls: list = field(default_factory=list)  # score() calls (1-based) that return a NaN reward


class NaNRewardTask(FirstChar):
    Config = NaNRewardConfig

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.config, self.calls = config, 0

    def score(self, prompts, texts):
        self.calls += 1
        bad = self.calls in self.config.nan_calls
        return {"accuracy": [float("nan") if bad and i == 0 else float(len(t) % 2) for i, t in enumerate(texts)]}


class FaultPlugins:
    @rlbench.hookimpl
    def rlbench_algorithms(self):
        return {"faulty_grpo": FaultyGRPO}

    @rlbench.hookimpl
    def rlbench_tasks(self):
        return {"nan_reward": NaNRewardTask}


@pytest.fixture
def fault_plugins():
    with manager.registered(FaultPlugins()):
        yield


def _params(tr):
    return {k: v.clone() for k, v in tr.policy.state_dict().items()}


def test_a_nan_loss_skips_the_update_and_is_counted(tmp_path, fault_plugins, first_char_task):
    cfg = tiny_config("train.steps=4", "model.tiny_init_std=0.3", task={"name": "first_char"},
                      algorithm={"name": "faulty_grpo", "beta": 0.05, "nan_steps": [2]})
    tr = start(cfg, tmp_path / "r")
    start_params = _params(tr)
    m1 = tr.step(1)
    assert m1.get("nonfinite/skipped") is None
    assert any(not torch.equal(start_params[k], v) for k, v in _params(tr).items())  # a real update
    before, adam_before = _params(tr), tr.optimizer.state_dict()["state"][0]["step"].item()
    m2 = tr.step(2)
    assert m2["nonfinite/skipped"] == 1.0 and m2["nonfinite/skipped_total"] == 1.0
    after = _params(tr)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at all
    assert tr.optimizer.state_dict()["state"][0]["step"].item() == adam_before
    assert all(p.grad is None for p in tr.policy.parameters())
    assert tr.nonfinite_streak == 1
    m3 = tr.step(3)
    assert "nonfinite/skipped" not in m3 and m3["nonfinite/skipped_total"] == 1.0 and tr.nonfinite_streak == 0
    assert any(not torch.equal(after[k], v) for k, v in _params(tr).items())
    # the offending batch is saved for inspection
    saved = torch.load(tmp_path / "r" / "faults" / "step_000002.pt", weights_only=False)
    assert saved["where"] == "loss" and saved["tensors"]["input_ids"].shape[0] == 16 and len(saved["texts"]) == 16
    assert torch.isfinite(saved["tensors"]["advantages"]).all()
    faults = rundir.read_jsonl(tmp_path / "r" / "faults.jsonl")
    assert [(f["step"], f["where"]) for f in faults] == [(2, "loss")]


def test_nan_gradients_and_nan_rewards_are_skipped_like_a_nan_loss(tmp_path, fault_plugins):
    cfg = tiny_config("train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                      algorithm={"name": "faulty_grpo", "beta": 0.0, "inf_grad_steps": [2]},
                      task={"name": "nan_reward", "nan_calls": [3]})
    summary = start(cfg, tmp_path / "r").run()
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [m.get("nonfinite/skipped", 0.0) for m in metrics] == [0.0, 1.0, 1.0]
    faults = rundir.read_jsonl(tmp_path / "r" / "faults.jsonl")
    assert [(f["step"], f["where"]) for f in faults] == [(2, "gradient norm"), (3, "rewards")]
    assert faults[1]["error"] == "non-finite rewards at step 3: components {'accuracy': 1}"
    assert summary["steps_done"] == 3
    # no checkpoint inside the streak, except the final one (its weights are step 1's: nothing was applied)
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*"))
    assert names == ["step_000001", "step_000003"]
    from safetensors.torch import load_file
    w1 = load_file(str(tmp_path / "r" / "checkpoints" / "step_000001" / "model.safetensors"))
    w3 = load_file(str(tmp_path / "r" / "checkpoints" / "step_000003" / "model.safetensors"))
    assert all(torch.equal(w1[k], w3[k]) for k in w1)


def test_several_nan_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint(tmp_path, fault_plugins):
    algo = {"name": "faulty_grpo", "beta": 0.05, "nan_steps": [3, 4, 5]}
    over = ("train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.max_nonfinite_steps=3")
    tr = start(tiny_config(*over, algorithm=algo), tmp_path / "r")
    with pytest.raises(TrainingError, match=r"3 steps in a row \(up to step 5\) had non-finite .* last good "
                                            r"checkpoint is .*step_000002"):
        tr.run()
    assert _steps(tmp_path / "r") == [1, 2, 3, 4, 5]
    ck = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000001", "step_000002"]
    assert not (tmp_path / "r" / "cost.json").exists()
    # the good checkpoint resumes (with the fault gone) and the run completes
    resumed = Trainer(tiny_config(*over, algorithm={**algo, "nan_steps": []}), tmp_path / "r", resume=True)
    assert resumed.step_done == 2 and resumed.nonfinite_streak == 0
    resumed.run()
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert not any(m.get("nonfinite/skipped") for m in metrics)
    assert rundir.read_jsonl(tmp_path / "r" / "faults.jsonl") == []  # the faults belonged to the lost future


def test_gradient_clipping_is_counted(tmp_path, first_char_task):
    tr = start(tiny_config("train.steps=2", "train.max_grad_norm=1e-6", "model.tiny_init_std=0.3",
                           task={"name": "first_char"}), tmp_path / "r")
    tr.run()
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [m["grad_clipped"] for m in metrics] == [1.0, 1.0]
    assert metrics[-1]["grad/clipped_total"] == 2.0


# -- engine faults -------------------------------------------------------------------------

@dataclass
class FlakyConfig(HFConfig):
    max_prompts: int = 0  # > 0: more prompts than this in one call is "out of memory"
    die_on_call: int = 0  # > 0: the n-th generate call of the first instance kills it
    always_fail: bool = False


class FlakyEngine(HFEngine):
    Config = FlakyConfig
    instances: list = []

    def __init__(self, config, model, tokenizer, device, seed=0):
        super().__init__(config, model, tokenizer, device, seed)
        self.calls, self.dead, self.model_at_start = 0, False, model
        FlakyEngine.instances.append(self)

    def generate(self, prompts, n, sampling):
        self.calls += 1
        if self.config.always_fail:
            raise RuntimeError("engine is broken")
        if self.config.max_prompts and len(prompts) > self.config.max_prompts:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({len(prompts)} prompts)")
        if len(FlakyEngine.instances) == 1 and self.calls == self.config.die_on_call:
            self.dead = True
        if self.dead:
            raise RuntimeError("EngineDeadError: engine core died unexpectedly")
        return super().generate(prompts, n, sampling)


class FlakyPlugin:
    @rlbench.hookimpl
    def rlbench_rollout_engines(self):
        return {"flaky": FlakyEngine}


@pytest.fixture
def flaky_engine():
    FlakyEngine.instances = []
    with manager.registered(FlakyPlugin()):
        yield


def test_out_of_memory_retries_with_smaller_batches(tmp_path, flaky_engine):
    cfg = tiny_config("train.steps=2", engine={"name": "flaky", "max_prompts": 1})  # 4 prompts → 2 + 2 → 1 × 4
    tr = start(cfg, tmp_path / "r")
    tr.run()
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert metrics[-1]["engine/retries_total"] == 6.0  # per step: the 4-batch once, each 2-batch once
    assert all(m["completion_len/mean"] > 0 for m in metrics) and len(FlakyEngine.instances) == 1
    # not enough halvings allowed: a clear error
    cfg = tiny_config("train.steps=1", "rollout.generate_retries=1", engine={"name": "flaky", "max_prompts": 1})
    with pytest.raises(TrainingError, match=r"rollout engine 'flaky' failed at step 1 on 2 prompts × 4 samples after 1 "
                                            r"halvings of the batch: RuntimeError: CUDA out of memory.*lower rollout"):
        start(cfg, tmp_path / "r2").run()


def test_a_dead_engine_is_rebuilt_from_the_current_policy(tmp_path, flaky_engine):
    cfg = tiny_config("train.steps=3", engine={"name": "flaky", "die_on_call": 2})
    tr = start(cfg, tmp_path / "r")
    tr.run()
    assert len(FlakyEngine.instances) == 2
    assert FlakyEngine.instances[1].model_at_start is tr.policy  # built from the trained policy
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["engine/restarts_total"] == 1.0
    cfg = tiny_config("train.steps=1", engine={"name": "flaky", "always_fail": True})
    with pytest.raises(TrainingError, match="failed at step 1 and again after a restart from the current policy: "
                                            "RuntimeError: engine is broken"):
        start(cfg, tmp_path / "r2").run()


# -- long prompts ------------------------------------------------------------------------------

@dataclass
class LongConfig:
    words: list = field(default_factory=lambda: [0, 3000, 0, 0])  # extra words per prompt


class LongPromptTask:
    Config = LongConfig

    def __init__(self, config, tokenizer):
        self.config, self.tok = config, tokenizer

    def prompts(self, split, n, seed):
        out = []
        for i in range(n):
            words = self.config.words[i % len(self.config.words)]
            text = self.tok.apply_chat_template([{"role": "user", "content": "word " * words + "Say hi."}],
                                                tokenize=False, add_generation_prompt=True)
            out.append(Prompt(id=f"p{i}", text=text, answer=None))
        return out

    def score(self, prompts, texts):
        return {"accuracy": [float(len(t) % 2) for t in texts]}


class LongPlugin:
    @rlbench.hookimpl
    def rlbench_tasks(self):
        return {"long_prompts": LongPromptTask}


@pytest.fixture
def long_task():
    with manager.registered(LongPlugin()):
        yield


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, long_task):
    # tiny-random's context is 2048 tokens: the 3000-word prompt cannot fit (default: skip)
    cfg = tiny_config("train.steps=2", "eval.after=true", task={"name": "long_prompts"})
    tr = start(cfg, tmp_path / "r")
    tr.run()
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [m["prompts/skipped"] for m in metrics] == [1.0, 1.0]
    assert metrics[-1]["prompts/skipped_total"] == 2.0
    assert rundir.read_jsonl(tmp_path / "r" / "eval.jsonl")[-1]["prompts_skipped"] == 2.0  # 8 eval prompts, 2 long
    assert metrics[0]["completion_len/mean"] > 0


def test_long_prompts_truncated_or_refused_by_config(tmp_path, long_task, tokenizer):
    cfg = tiny_config("rollout.max_prompt_tokens=40", "rollout.long_prompts=truncate",
                      task={"name": "long_prompts", "words": [0, 50]})
    tr = start(cfg, tmp_path / "r")
    m: dict = {}
    prompts = tr.task.prompts("train", 2, seed=0)
    fitted = tr.sampler.fit_prompts(prompts, m, step=1)
    short_len = len(tokenizer(prompts[0].text, add_special_tokens=False)["input_ids"])
    assert short_len <= 40 and fitted[0] == prompts[0]
    ids = tokenizer(fitted[1].text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 41 and fitted[1].text.endswith("Say hi.<|im_end|>\n<|im_start|>assistant\n")  # the end is kept
    assert m == {"prompts/skipped": 0.0, "prompts/truncated": 1.0}
    cfg = tiny_config("rollout.max_prompt_tokens=40", "rollout.long_prompts=error",
                      task={"name": "long_prompts", "words": [0, 50]})
    with pytest.raises(TrainingError, match=r"prompt 'p1' at step 1 has \d+ tokens, more than the limit of 40"):
        start(cfg, tmp_path / "r2").run()


# -- determinism -----------------------------------------------------------------------------

def test_the_same_config_and_seed_reproduce_the_same_metrics_exactly_with_hf(tmp_path):
    over = ("train.steps=3", "rollout.temperature=1.0", "algorithm.beta=0.05", "eval.before=true", "eval.after=true")
    runs = []
    for name in ("a", "b"):
        start(tiny_config(*over), tmp_path / name).run()
        runs.append((rundir.read_jsonl(tmp_path / name / "metrics.jsonl"), rundir.read_jsonl(tmp_path / name / "eval.jsonl")))
    assert _comparable(runs[0][0]) == _comparable(runs[1][0])
    assert _comparable(runs[0][1]) == _comparable(runs[1][1])
    assert json.dumps(_comparable(runs[0][0])) == json.dumps(_comparable(runs[1][0]))  # bit-for-bit, not just ==
