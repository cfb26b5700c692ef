"""The plugin protocols: what a registered plugin provides (rlbench/hookspecs.py says how each is
registered and built). Public under ``rlbench.types`` (Algorithm, RolloutEngine, Task, Environment,
Logger, Job, Executor); the data they exchange is defined there.

Not covered: run-time checking of a plugin against them; they are structural types for
annotations and readers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from rlbench.types import Needs, Prompt, Rollouts, Sampling, StepContext, TrainBatch

class Algorithm(Protocol):
    """``Class(config)``; ``needs`` tells the trainer what to compute, ``prepare`` turns a step's
    rollouts into a batch, ``loss`` is one micro-batch's share (rlbench_algorithms)."""

    Config: type

    @classmethod
    def needs(cls, config: Any) -> Needs: ...

    def prepare(self, rollouts: Rollouts, rewards: torch.Tensor, ctx: StepContext) -> TrainBatch: ...

    def loss(self, logprobs: torch.Tensor, batch: TrainBatch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_step(self, metrics: dict[str, float]) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RolloutEngine(Protocol):
    """``Class(config, model, tokenizer, device, seed=seed)``; completions group-major with the
    sampled tokens' logprobs of π_T (rlbench_rollout_engines)."""

    Config: type

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> Rollouts: ...

    def sync(self, model: torch.nn.Module) -> None: ...


class Task(Protocol):
    """``Class(config, tokenizer)``; named reward components, ``accuracy`` among them (rlbench_tasks).
    Optional: ``gold(prompt) -> str | None``, the reference written as a completion (the task
    check's self-check, sft's demonstrations); ``splits() -> list[str]``, the held-out splits
    ``prompts`` serves besides ``test`` (``eval.splits``; out-of-distribution ones named ``ood_*``)."""

    Config: type

    def prompts(self, split: str, n: int, seed: int) -> list[Prompt]: ...

    def score(self, prompts: list[Prompt], texts: list[str]) -> dict[str, list[float]]: ...


class Environment(Protocol):
    """One trajectory's environment, in the shape of TRL's ``environment_factory``
    (rlbench_environments): ``reset(**row)`` opens it; its other public methods are tools, or
    ``step(text) -> (observation | None, done)`` answers each turn; ``get_reward()`` and
    ``turn_rewards()`` are optional."""

    def reset(self, **row: Any) -> str | None: ...


class Logger(Protocol):
    """``Class(run_dir, config)``; every step's metrics line (rlbench_loggers)."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class Job(Protocol):
    """One run of a suite as an executor sees it (rlbench.suites.jobs.Job)."""

    name: str
    log: Any  # Path: the file its output is appended to
    processes: int  # processes per machine

    def command(self, machines: int = 1, machine_rank: int = 0, main_ip: str = "127.0.0.1",
                port: int | None = None) -> list[str]: ...


class Executor(Protocol):
    """``Class(config, suite_dir)``; where a suite's runs execute (rlbench_executors)."""

    Config: type
    name: str
    parallel: int

    def submit(self, job: Job) -> str: ...

    def poll(self, job_ids: list[str]) -> dict[str, str]: ...

    def cancel(self, job_ids: list[str]) -> None: ...


# Users and annotations name them rlbench.types.<Protocol> (the plugin API's import path); where the
# classes happen to be defined is not part of that name.
for _protocol in (Algorithm, RolloutEngine, Task, Environment, Logger, Job, Executor):
    _protocol.__module__ = "rlbench.types"
del _protocol
