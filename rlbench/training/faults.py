"""What can go wrong during a run, and the record it leaves.

  * ``TrainingError``: the run cannot go on; the message names the cause and what is intact.
  * ``NonFiniteError``: NaN/inf in a step's rewards, loss or gradients. The step applies no
    (further) update; ``FaultLog.skipped`` saves its batch under ``faults/step_N.pt`` and a line in
    ``faults.jsonl``; ``train.max_nonfinite_steps`` such steps in a row stop the run.
  * ``StopSignals``: SIGINT / SIGTERM ask the loop to stop after the current step (a second one
    raises KeyboardInterrupt at once).
Engine failures (out of memory, a dead engine) are recovered in ``rlbench.training.sampler``.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from rlbench import rundir


class TrainingError(RuntimeError):
    pass


class NonFiniteError(TrainingError):
    """NaN/inf in the rewards, the loss or the gradients of a step: the step applies no
    (further) update; ``payload`` is what is saved under faults/ for inspection."""

    def __init__(self, where: str, step: int, detail: str = "", payload: dict | None = None):
        super().__init__(f"non-finite {where} at step {step}{': ' + detail if detail else ''}")
        self.where, self.step, self.payload = where, step, payload or {}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


class FaultLog:
    """``faults/`` and ``faults.jsonl`` of a run directory; ``streak`` counts skipped steps in a row."""

    def __init__(self, run_dir: Path, rank: int, world: int):
        self.run_dir, self.rank, self.world = Path(run_dir), rank, world
        self.streak = 0

    def skipped(self, step: int, e: NonFiniteError, optimizer_steps_applied: int) -> Path:
        """Save the offending batch (every rank its own in a multi-process run), add a line to
        faults.jsonl (rank 0) and say so on stderr. Returns the batch file."""
        self.streak += 1
        faults = self.run_dir / "faults"
        faults.mkdir(exist_ok=True)
        path = faults / (f"step_{step:06d}.pt" if self.world == 1 else f"step_{step:06d}.rank{self.rank}.pt")
        torch.save({"step": step, "where": e.where, "error": str(e), **e.payload}, path)
        if self.rank == 0:
            rundir.append_jsonl(self.run_dir / "faults.jsonl", {
                "step": step, "kind": "nonfinite", "where": e.where, "error": str(e), "batch": str(path.name),
                "optimizer_steps_applied": optimizer_steps_applied, "streak": self.streak})
            print(f"rlbench: {e}; update skipped ({self.streak} in a row, batch saved to {path})", file=sys.stderr)
        return path

    def too_many(self, limit: int, step: int, good_checkpoint: Path | None) -> TrainingError | None:
        """The error that stops the run once ``limit`` steps in a row were skipped, else None."""
        if self.streak < limit:
            return None
        return TrainingError(
            f"{self.streak} steps in a row (up to step {step}) had non-finite rewards, loss or "
            f"gradients (train.max_nonfinite_steps={limit}); stopping. Their "
            f"batches are in {self.run_dir / 'faults'}; the last good checkpoint is "
            f"{good_checkpoint if good_checkpoint else '(none written yet)'}.")


def batch_payload(rollouts, rewards, mini_batch, epoch: int, index: int) -> dict:
    """What faults/step_N.pt holds for a bad update: the mini-batch's tensors, the step's
    prompts, completions and rewards."""
    return {"epoch": epoch, "mini_batch": index, "tensors": {k: v.detach().cpu() for k, v in mini_batch.tensors.items()},
            "totals": dict(mini_batch.totals), "prompts": [p.text for p in rollouts.prompts], "texts": rollouts.texts,
            "group": rollouts.group, "rewards": rewards}


def stale_weights(step: int, drift: float, drift_mean: float, limit: float) -> TrainingError:
    """The first update of a step found the sampler's logprobs far from the policy's."""
    return TrainingError(
        f"rollout weights are stale: at step {step} the sampler's logprobs differ from the policy's "
        f"by up to {drift:.3g} nats (mean {drift_mean:.3g}), above rollout.max_logprob_drift={limit:g}. "
        f"The engine is not serving the trained weights (is engine.sync off, or did a weight sync fail?). "
        f"No update was applied; the last checkpoint is intact.")


class StopSignals:
    """SIGINT / SIGTERM set ``received`` (the loop stops after the current step); a second one
    raises KeyboardInterrupt. Handlers are installed only in the main thread (Python's rule)."""

    def __init__(self):
        self.received: int | None = None

    @contextmanager
    def installed(self, describe=lambda: "the current step"):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.received is not None:
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
            self.received = signum
            print(f"rlbench: {signal.Signals(signum).name}: finishing {describe()}, then writing a "
                  f"checkpoint (send it again to stop at once)", file=sys.stderr)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
