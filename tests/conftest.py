import os

# One MKL code path on every x86 machine (conditional numerical reproducibility), set before torch
# loads MKL: the equivalence tests compare computations whose float32 reductions differ in order,
# and MKL's default path on some CPUs rounds differently from the AVX2 one their
# tolerances were measured on (seen on an AMD EPYC with AVX2, where MKL picks another path by
# default: ZeRO-2 vs 1 process grad_norm off by 1.5e-4 relative after 4 steps). Subprocesses
# (accelerate launch, suites) inherit it.
os.environ.setdefault("MKL_CBWR", "AVX2")
# The tests run on two pytest-xdist workers (pyproject's addopts) that share the cores with the
# runs they start: OpenMP threads that spin while they wait for work took CPU time from the other
# worker (a sample of five test files: 347 s on two workers vs 136 s on one; with idle threads
# sleeping, 95 s). Threads still compute in parallel; only their waiting changes, not the numbers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {
    "run": {"name": "t", "seed": 0},
    "model": {"name": "tiny-random"},
    "task": {"name": "arithmetic", "digits": 2},
    "engine": {"name": "hf"},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_tokens": 8},
    "algorithm": {"name": "grpo"},
    "train": {"steps": 2, "lr": 1e-3, "checkpoint_every": 0, "micro_batch_size": 8},
    "eval": {"n": 8, "max_tokens": 8, "before": False, "after": False},
    "logging": {"loggers": [], "progress": False},
}


def tiny_config(*overrides: str, **sections: dict):
    """The tiny-random test config: whole sections replaced by keyword, then ``section.key=value`` overrides."""
    from rlbench import config

    return config.resolve({**TINY, **sections}, list(overrides))


def train(cfg, run_dir):
    """A whole training run of ``cfg`` into ``run_dir`` (engine closed after); its metrics lines."""
    import json

    from rlbench.training import trainer

    t = trainer.start(cfg, run_dir)
    try:
        t.run()
    finally:
        t.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tokenizer():
    from rlbench.modeling import models

    return models.load_tokenizer("tiny-random")


# -- a task the tiny random model can learn (registered at run time, like a notebook would;
# subprocesses load the same module through RLBENCH_PLUGINS) --

import rlbench  # noqa: E402
from rlbench_testing_plugins import FirstChar  # noqa: E402,F401


class FirstCharPlugin:
    @rlbench.hookimpl
    def rlbench_tasks(self):
        return {"first_char": FirstChar}


@pytest.fixture
def first_char_task():
    from rlbench import manager

    with manager.registered(FirstCharPlugin()):
        yield
