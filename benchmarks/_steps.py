"""Shared by the benchmarks: run N training steps of a config in this process, evaluation,
checkpoints and logging sinks off, and return what each step reported."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

QUIET = ["eval.before=false", "eval.after=false", "train.checkpoint_every=0", "logging.progress=false",
         "logging.loggers=[]"]


@dataclass
class Steps:
    metrics: list = field(default_factory=list)  # each step's metrics (time/<phase> included)
    seconds: list = field(default_factory=list)  # each step's wall time
    params: int = 0
    engine: str = ""


def run_steps(config: str | Path, overrides: list[str], steps: int) -> Steps:
    from rlbench import config as cfgmod
    from rlbench.training.trainer import start

    cfg = cfgmod.load(config, [*QUIET, f"train.steps={steps}", *overrides])
    out = Steps(engine=cfg.names["engine"])
    with tempfile.TemporaryDirectory() as d:
        tr = start(cfg, Path(d) / "run")
        out.params = tr.n_params
        try:
            for step in range(1, steps + 1):
                t = time.perf_counter()
                out.metrics.append(tr.step(step))
                out.seconds.append(time.perf_counter() - t)
                tr.step_done = step
        finally:
            tr.close()
    return out
