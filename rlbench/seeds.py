"""The seeds of a run, in one place: every random stream rlbench draws is derived here from the run
seed and a position (step, round, epoch, prompt id), so a resumed or re-sharded run repeats it."""
from __future__ import annotations

import hashlib

def data_seed(run_seed: int, step: int, round_: int = 0) -> int:
    """The seed that draws step ``step``'s prompts (round 0: the data position; later rounds:
    dynamic sampling's extra prompts). The position is the step, so resuming needs no sampler state."""
    return run_seed * 1_000_003 + step + round_ * 100_000_019


def shuffle_seed(run_seed: int, step: int, epoch: int) -> int:
    """The seed of step ``step``'s mini-batch shuffle in epoch ``epoch`` (a resumed run repeats it)."""
    return run_seed * 1_000_003 + step * 1_009 + epoch


def engine_seed(run_seed: int, step: int) -> int:
    """The seed a rollout engine is built with: the run seed at the start; an engine rebuilt at
    step ``step`` (after a failure) gets a fresh stream instead of replaying the first step's."""
    return run_seed if step == 0 else data_seed(run_seed, step, round_=7)


def batch_seed(run_seed: int, step: int) -> int:
    """The seed torch's generator gets before step ``step``'s batch is sampled with
    asynchronous rollouts (rlbench/training/async_rollouts.py): the samples depend on (seed, step) only."""
    return prompt_seed(run_seed, f"batch:{step}")


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A 63-bit seed for one prompt's samples (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "little") >> 1
