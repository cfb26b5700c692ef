"""One test per hook: each is called, with the documented arguments, and its result used."""
from dataclasses import dataclass

import pytest

import rlbench
from rlbench import manager, rundir
from rlbench.training.trainer import start

from conftest import tiny_config


class Recorder:
    def __init__(self):
        self.calls = []

    @rlbench.hookimpl
    def rlbench_on_rollouts(self, step, rollouts, rewards):
        self.calls.append(("rollouts", step, rollouts.n, sorted(rewards)))
        return {"custom/first_len": float(rollouts.lengths()[0])}

    @rlbench.hookimpl
    def rlbench_on_step_end(self, step, metrics):
        self.calls.append(("step_end", step, metrics["reward/mean"]))

    @rlbench.hookimpl
    def rlbench_on_run_end(self, run_dir, summary):
        self.calls.append(("run_end", run_dir, summary["tokens_generated"]))


@pytest.fixture
def recorder():
    rec = Recorder()
    name = manager.register(rec, name="recorder")
    yield rec
    manager.unregister(name)


@pytest.fixture
def recorded_run(recorder, tmp_path):
    start(tiny_config("train.steps=2"), tmp_path / "r").run()
    return recorder, tmp_path / "r"


def test_hook_rlbench_on_rollouts(recorded_run):
    rec, run = recorded_run
    assert [c[:4] for c in rec.calls if c[0] == "rollouts"] == [("rollouts", 1, 16, ["accuracy", "format"]),
                                                                ("rollouts", 2, 16, ["accuracy", "format"])]
    lines = rundir.read_jsonl(run / "metrics.jsonl")
    assert all("custom/first_len" in r for r in lines)  # returned metrics are merged


def test_hook_rlbench_on_step_end(recorded_run):
    rec, run = recorded_run
    lines = rundir.read_jsonl(run / "metrics.jsonl")
    assert [c for c in rec.calls if c[0] == "step_end"] == [("step_end", r["step"], r["reward/mean"]) for r in lines]


def test_hook_rlbench_on_run_end(recorded_run):
    rec, run = recorded_run
    ends = [c for c in rec.calls if c[0] == "run_end"]
    assert len(ends) == 1 and ends[0][1] == str(run) and ends[0][2] == 2 * 16 * 8


@dataclass
class _Cfg:
    scale: float = 1.0


@dataclass(frozen=True)
class _ZooHookOptions:
    threshold: float = 0.5  # an event-hook plugin's own option


class _Zoo:
    """Registers one object of each kind, as a third-party package would."""

    @rlbench.hookimpl
    def rlbench_algorithms(self):
        return {"zoo_algo": "rlbench.plugins.algorithms.grpo:GRPO"}

    @rlbench.hookimpl
    def rlbench_rollout_engines(self):
        return {"zoo_engine": "rlbench.plugins.engines.hf:HFEngine"}

    @rlbench.hookimpl
    def rlbench_tasks(self):
        return {"zoo_task": "rlbench.tasks.arithmetic:Arithmetic"}

    @rlbench.hookimpl
    def rlbench_loggers(self):
        return {"zoo_logger": "tests_missing_module:Nope"}

    @rlbench.hookimpl
    def rlbench_hook_options(self):
        return {"zoo_hook": _ZooHookOptions}

    seen: list = []

    @rlbench.hookimpl
    def rlbench_on_rollouts(self, step, config):
        self.seen.append((step, config.hooks["zoo_hook"].threshold))


@pytest.fixture
def zoo():
    name = manager.register(_Zoo(), name="zoo")
    yield name
    manager.unregister(name)


def test_hook_rlbench_algorithms(zoo, tmp_path):
    from rlbench.plugins.algorithms.grpo import GRPO

    assert manager.get("algorithm", "zoo_algo") is GRPO
    cfg = tiny_config("algorithm.name=zoo_algo", "train.steps=1")
    assert cfg.names["algorithm"] == "zoo_algo"
    start(cfg, tmp_path / "a").run()
    assert len(rundir.read_jsonl(tmp_path / "a" / "metrics.jsonl")) == 1


def test_hook_rlbench_rollout_engines(zoo):
    from rlbench.plugins.engines.hf import HFEngine

    assert manager.get("engine", "zoo_engine") is HFEngine
    assert any(e.name == "zoo_engine" and e.source == "runtime:zoo" for e in manager.entries("engine"))


def test_hook_rlbench_tasks(zoo, tokenizer):
    cfg = tiny_config("task.name=zoo_task", "task.digits=1")
    task = manager.get("task", cfg.names["task"])(cfg.task, tokenizer)  # built as a run builds it
    problems = task.prompts("test", 5, seed=0)
    assert len(problems) == 5 and all(p.text and 0 <= int(p.answer) <= 18 for p in problems)  # sums of 1-digit numbers
    scores = task.score(problems[:2], [f"<answer>{problems[0].answer}</answer>", f"<answer>{int(problems[1].answer) + 1}</answer>"])
    assert scores["accuracy"] == [1.0, 0.0]


def test_hook_rlbench_loggers(zoo, tmp_path):
    # a logger whose module is missing fails only when selected, with a message naming it
    with pytest.raises(manager.PluginError, match="logger 'zoo_logger' .* failed to load 'tests_missing_module:Nope'"):
        manager.get("logger", "zoo_logger")
    cfg = tiny_config("train.steps=1", logging={"loggers": ["tensorboard"], "progress": False})
    start(cfg, tmp_path / "tb").run()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    ea.Reload()
    assert "reward/mean" in ea.Tags()["scalars"]


def test_wandb_logger_writes_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config("train.steps=1", logging={"loggers": ["wandb"], "progress": False, "wandb_mode": "offline"})
    start(cfg, tmp_path / "wb").run()
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_hook_rlbench_hook_options(zoo, tmp_path, capsys):
    from rlbench import config
    from rlbench.config import ConfigError

    cfg = tiny_config("train.steps=1", hooks={"zoo_hook": {"threshold": 0.25}})
    assert cfg.hooks["zoo_hook"] == _ZooHookOptions(0.25) and cfg.hooks["aha"].examples == 2  # every hook: defaults
    with pytest.raises(ConfigError, match=r"unknown key 'treshold' in section 'hooks.zoo_hook'; did you mean 'threshold'"):
        tiny_config(hooks={"zoo_hook": {"treshold": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown hook plugin 'zoo_hok' in section 'hooks'; did you mean 'zoo_hook'"):
        tiny_config(hooks={"zoo_hok": {}})
    _Zoo.seen.clear()
    start(cfg, tmp_path / "h").run()
    assert _Zoo.seen == [(1, 0.25)]  # the hook read its own option from the run's config
    again = config.load(tmp_path / "h" / "config.yaml")  # written with the hooks section, read back the same
    assert again.hooks["zoo_hook"].threshold == 0.25 and again.hooks["aha"] == cfg.hooks["aha"]
    # the aha detector's options moved from logging: the old keys are read where they are now
    old = tiny_config(logging={"loggers": [], "progress": False, "aha_phrases": ["hmm"], "aha_examples": 0})
    assert old.hooks["aha"].phrases == ["hmm"] and old.hooks["aha"].examples == 0
    assert "logging.aha_phrases is now hooks.aha.phrases" in capsys.readouterr().err
