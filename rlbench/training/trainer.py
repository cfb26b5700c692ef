"""The training loop: rollouts → rewards → algorithm → update → sync, one step at a time.

One step (``Trainer.step``), its phases in order:
  1. ``Sampler.sample``: B prompts from the task's train split (seeded by run seed and step: the
     data position is the step number, so resuming needs no sampler state), G completions per
     prompt from the engine, the task's named reward components (and dynamic sampling's refills);
  2. ``Updater.score``: the no-grad passes an algorithm may use in ``prepare``: reference
     logprobs, old-policy logprobs (μ > 1 or mini-batches), the critic's values;
  3. ``Algorithm.prepare``: rollouts + rewards + context → TrainBatch (advantages, pairs, …);
  4. ``Updater.update``: μ epochs × mini-batches of optimizer steps, each over micro-batches with
     gradient accumulation (loss shares normalised by whole-batch totals, so micro-batching does
     not change the loss or gradient), clipping, AdamW, warmup + cosine; before the first
     optimizer step the sampler's logprobs are checked against the trained weights and the
     sampling policy's KL and entropy are measured (rlbench/training/update.py);
  5. ``Sampler.sync``: the engine serves the new weights.
With ``rollout.off_policy_steps`` k > 0 the sampler is ``AsyncRollouts`` (rlbench/training/async_rollouts.py):
phase 1 takes the batch a background worker generated from the weights of k updates earlier while
the previous steps trained, and phase 5 pushes the new weights to it as the next version.
Held-out evaluation (greedy pass@1 and the exact KL to the reference on the policy's own greedy
completions, the same for every algorithm) runs before, every ``eval.every`` steps and after.

Where the rest lives: run setup (models, reference, optimizer, schedule) in rlbench/training/setup.py,
sampling and engine faults in rlbench/training/sampler.py, the update and its steppers in
rlbench/training/update.py (gradient accumulation in rlbench/training/accumulate.py), checkpoints in rlbench/training/checkpoints.py, counters and cost.json in
rlbench/training/cost.py, the fault types and signals in rlbench/training/faults.py, the metrics line in
rlbench/training/step_metrics.py.

Faults: a step whose rewards, loss or gradient norm is NaN/inf applies no (further) update
(counted, its batch saved under faults/), ``train.max_nonfinite_steps`` in a row stop the run;
SIGINT/SIGTERM finish the current step, write a checkpoint and return.

Several processes (``accelerate launch``): each rank samples a shard of the step's prompts; loss
normalisers and gradients are summed over ranks; rank 0 writes. DeepSpeed ZeRO-2/3: the
DeepSpeed engine reduces, clips and steps (rlbench/training/zero.py).

Not covered: tensor/pipeline parallelism; a critic (PPO) or ZeRO-3 LoRA under DeepSpeed; DeepSpeed
checkpoints resumed at another world size (DeepSpeed's universal checkpoints are not wired in).
"""
from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from rlbench import manager, rundir
from rlbench.training import async_rollouts, dist, setup, step_metrics, task_check
from rlbench import config as cfgmod
from rlbench.training.checkpoints import Checkpoints, Restorable, restore
from rlbench.training.cost import CostMeter
from rlbench.training.evaluation import during_training
from rlbench.training.faults import FaultLog, NonFiniteError, StopSignals, TrainingError
from rlbench.training.sampler import EngineSpec, Sampler
from rlbench.types import StepContext, TrainBatch
from rlbench.training.update import PlainStepper, Updater, ZeroStepper

__all__ = ["Trainer", "TrainingError", "NonFiniteError", "start"]


class Trainer:
    def __init__(self, cfg: cfgmod.Config, run_dir: str | Path, resume: bool = False):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        s = setup.build(cfg)
        self.accelerator, self.device, self.rank, self.world = s.accelerator, s.device, s.rank, s.world
        self.is_main = s.rank == 0
        self.task, self.algorithm, self.needs = s.task, s.algorithm, s.needs
        self.eval_splits = s.eval_splits  # eval.splits resolved at setup
        self.model, self.optimizer, self.scheduler, self.critic = s.model, s.optimizer, s.scheduler, s.critic
        self.reference, self.zero, self.weights = s.reference, s.zero, s.weights
        self.n_params, self.n_critic, self.model_hash = s.n_params, s.n_critic, s.model_hash
        self.meter = CostMeter(cfg.train.max_generated_tokens, cfg.train.max_flops, cfg.train.max_device_seconds,
                               n_params=s.n_params, n_critic=s.n_critic, n_teacher=s.n_teacher, world=s.world)
        self.meter.add_time("load", s.load_seconds, step=False)
        stepper = ZeroStepper(s.zero) if s.zero else \
            PlainStepper(s.accelerator, s.model, s.optimizer, s.critic, cfg.train.max_grad_norm)
        self.updater = Updater(s, stepper, self.meter, cfg.train, cfg.rollout, eval_kl=cfg.eval.kl)
        self.checkpoints = Checkpoints(self.run_dir, cfg.train.keep_checkpoints, s.rank)
        self.faults = FaultLog(self.run_dir, s.rank, s.world)
        self.signals = StopSignals()
        self.step_done = 0
        self._fractions_done: set[float] = set()  # eval.at_budget_fractions already evaluated
        self._timeline_lock = threading.Lock()
        pending = self._resume() if resume else []  # the engine is built next, from the restored weights
        asynchronous = cfg.rollout.off_policy_steps > 0  # a worker owns the engine (rlbench/training/async_rollouts.py)
        if asynchronous:
            async_rollouts.check_supported(cfg, s)
        served = async_rollouts.Version.copy_of(s.weights, self.step_done) if asynchronous else s.weights
        self.sampler = Sampler(s, served, self.meter, EngineSpec.of(cfg), cfg.rollout, cfg.eval.max_tokens)
        self.batch_invariant = self.sampler.batch_invariant  # rollout.batch_invariant_sampling, resolved
        if asynchronous:
            self.sampler = async_rollouts.AsyncRollouts(
                self.sampler, s.weights, cfg.rollout.off_policy_steps, cfg.train.steps, s.max_drift, pending,
                timeline=self.timeline if self.is_main else None)
        self.ref_quant = setup.reference_quantization_error(cfg, s, self.sampler.engine, self.run_dir, resume)
        self.loggers = [manager.get("logger", name)(self.run_dir, cfg) for name in cfg.logging.loggers] \
            if self.is_main else []

    @property
    def policy(self):
        """The policy module that trains (unwrapped from DDP / DeepSpeed)."""
        return self.weights.policy

    @property
    def engine(self):
        return self.sampler.engine

    @property
    def nonfinite_streak(self) -> int:
        return self.faults.streak

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``train.steps`` (or the token budget). SIGINT/SIGTERM finish the current step,
        write a checkpoint and return early with ``summary["interrupted"]`` set (no cost.json,
        so suites see the run as unfinished); a second signal interrupts at once."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.signals.installed(lambda: f"step {self.step_done + 1}"):
            evals = rundir.read_jsonl(self.run_dir / "eval.jsonl")
            fractions = cfg.eval.at_budget_fractions
            self._fractions_done = {f for e in evals for f in e.get("budget_fractions", [])}
            if (cfg.eval.before or 0.0 in fractions) and self.step_done == 0 and not any(e["step"] == 0 for e in evals):
                self.evaluate(0)
            bar = None
            if cfg.logging.progress and self.is_main:
                bar = tqdm(total=cfg.train.steps, initial=self.step_done, desc=cfg.run.name, unit="step")
            saved = self.step_done
            try:
                while not self._done() and self.signals.received is None:
                    step = self.step_done + 1
                    metrics = self.step(step)
                    self.step_done = step
                    self._log(step, metrics)
                    if dist.any_true(self.signals.received is not None) and self.signals.received is None:
                        self.signals.received = signal.SIGTERM  # another rank was signalled: stop together
                    if bar is not None:
                        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                        acc=f"{metrics.get('reward/accuracy', float('nan')):.3f}",
                                        kl=f"{metrics.get('kl', 0.0):.4f}")
                        bar.update(1)
                    error = self.faults.too_many(cfg.train.max_nonfinite_steps, step, self.checkpoints.latest())
                    if error:
                        raise error
                    last = self._done()
                    if not last and ((cfg.eval.every and step % cfg.eval.every == 0) or self._fractions_due()):
                        self.evaluate(step)
                    due = last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
                    if due and (self.faults.streak == 0 or last):  # no checkpoint inside a streak of bad steps
                        self.save_checkpoint(step)
                        saved = step
            finally:
                if bar is not None:
                    bar.close()
            if self.signals.received is not None and not self._done():
                return self._interrupted(saved)
        final = rundir.read_jsonl(self.run_dir / "eval.jsonl")
        if (cfg.eval.after or 1.0 in cfg.eval.at_budget_fractions) and not any(e["step"] == self.step_done for e in final):
            self.evaluate(self.step_done)
        summary = self.write_cost()
        summary["eval"] = rundir.read_jsonl(self.run_dir / "eval.jsonl")
        if self.is_main:
            manager.hook().rlbench_on_run_end(run_dir=str(self.run_dir), summary=summary)
        self._close_loggers()
        return summary

    def _done(self) -> bool:
        return self.step_done >= self.cfg.train.steps or self.meter.budget_spent() is not None

    def _fractions_due(self) -> list[float]:
        """The budget fractions (``eval.at_budget_fractions``, not 0 or 1) first reached by now."""
        now = self.meter.fraction(self.step_done, self.cfg.train.steps)  # the same on every rank
        return [f for f in self.cfg.eval.at_budget_fractions
                if 0 < f < 1 and f <= now + 1e-12 and f not in self._fractions_done]

    def step(self, step: int) -> dict[str, float]:
        """One training step, its phases in order (see the module docstring). A NaN/inf in its
        rewards, loss or gradients skips the (rest of the) update: counted, the batch saved to
        faults/step_N.pt, a line in faults.jsonl."""
        cfg, meter = self.cfg, self.meter
        meter.start_step()
        self.updater.applied = 0
        try:
            sample = self.sampler.sample(step)  # prompts, rollouts, rewards
            meter.count("tokens/generated", sample.generated_tokens)  # counted now: a skipped step still cost them
            meter.count("tokens/prompt", sample.prompt_tokens)
            extra = self._on_rollouts(step, sample)
            with meter.timed("reference"):  # the no-grad passes that prepare() may use
                ctx = self.updater.score(sample.rollouts, step)
            batch = self._prepare(sample, ctx)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's (first) update uses
            with meter.timed("train"):
                self.sampler.offload()
                started = time.time()
                train_metrics = self.updater.update(batch, ctx.to(self.device), step, sample.rollouts, sample.rewards)
                self.timeline("update", step, started, time.time())
            with meter.timed("sync"):  # every optimizer step: the next rollouts use the new weights
                self.sampler.sync()
        except NonFiniteError as e:  # raised on every rank alike (the decision is agreed on)
            return self._skipped(step, e)
        self.faults.streak = 0
        meter.flush()  # every rank's counts, summed
        metrics = step_metrics.record(step, sample, {**train_metrics, "lr": lr}, batch.metrics, meter, self.weights)
        if self.ref_quant:
            metrics["kl/ref_quant_error"] = self.ref_quant["mean_abs_logprob_error"]
        metrics.update(extra)  # the event hooks'
        metrics.update(self.algorithm.after_step(metrics))
        return metrics

    def _on_rollouts(self, step: int, sample) -> dict:
        """The event hooks on this step's rollouts (rank 0's shard); their extra metrics."""
        extra = {}
        if self.is_main:
            for res in manager.hook().rlbench_on_rollouts(step=step, rollouts=sample.sampled, rewards=sample.components,
                                                          run_dir=str(self.run_dir), config=self.cfg):
                extra.update(res or {})
        return extra

    def _prepare(self, sample, ctx: StepContext) -> TrainBatch:
        batch = self.algorithm.prepare(sample.rollouts, sample.rewards, ctx)
        if "row" not in batch and batch.size != sample.rollouts.n:
            raise TrainingError(f"algorithm {self.cfg.names['algorithm']!r}: prepare() returned {batch.size} rows for "
                                f"{sample.rollouts.n} rollouts without their 'row' index; build the batch with "
                                "TrainBatch.from_rollouts and select rows from it")
        return batch.to(self.device)

    def _skipped(self, step: int, e: NonFiniteError) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        # an earlier mini-batch of this step was applied: the engine needs it (asynchronous: a version per step)
        self.sampler.sync(changed=bool(self.updater.applied))
        self.meter.flush()
        self.meter.counters["nonfinite/skipped"] += 1
        self.faults.skipped(step, e, self.updater.applied)
        return {"step": step, "nonfinite/skipped": 1.0, "nonfinite/skipped_total": self.meter.counters["nonfinite/skipped"],
                **{f"time/{k}": v for k, v in self.meter.last.items()},
                "tokens/generated_total": self.meter.counters["tokens/generated"]}

    def _interrupted(self, saved: int) -> dict:
        if saved != self.step_done and self.step_done > 0:
            self.save_checkpoint(self.step_done)
        name = signal.Signals(self.signals.received).name
        if self.is_main:
            print(f"rlbench: {name} received: stopped after step {self.step_done}"
                  + (f", checkpoint {self.checkpoints.latest()}" if self.step_done else "")
                  + f"; continue with: rlbench run --resume {self.run_dir}", file=sys.stderr)
        self._close_loggers()
        return {"interrupted": name, "steps_done": self.step_done, "eval": rundir.read_jsonl(self.run_dir / "eval.jsonl")}

    # -- records ---------------------------------------------------------------------------------
    def _log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        rundir.append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        for lg in self.loggers:
            lg.log(step, metrics)
        manager.hook().rlbench_on_step_end(step=step, metrics=metrics)

    def timeline(self, phase: str, step: int, start: float, end: float, **extra) -> None:
        """A line of timeline.jsonl (asynchronous runs: when each batch was generated and each
        update ran, wall-clock seconds)."""
        if not (self.is_main and self.cfg.rollout.off_policy_steps):
            return
        with self._timeline_lock:
            rundir.append_jsonl(self.run_dir / "timeline.jsonl",
                                {"phase": phase, "step": step, "start": start, "end": end, **extra})

    def _close_loggers(self) -> None:
        for lg in self.loggers:
            lg.close()

    def evaluate(self, step: int) -> dict:
        """Held-out evaluation (``rlbench.training.evaluation.during_training``), written to eval.jsonl."""
        with self.sampler.evaluation() as sampler:  # asynchronous: the engine between two batches, current weights
            rec = during_training(sampler, self.weights, self.reference, self.cfg.eval, self.updater.plan, step,
                                  self.eval_splits)
        if self.ref_quant:
            rec["ref_quant_error"] = self.ref_quant["mean_abs_logprob_error"]
        spent = self.meter.spent()  # the compute axes; the timed ones apart ("time…" keys: not reproducible)
        rec["spent"] = {k: spent[k] for k in ("flops", "tokens")}
        rec["time_spent"] = {k: spent[k] for k in ("device_seconds", "wall_seconds")}
        fractions = self.cfg.eval.at_budget_fractions
        if fractions:
            final = self._done() and step == self.step_done and step > 0
            rec["budget_fraction"] = self.meter.fraction(step, self.cfg.train.steps)
            rec["budget_fractions"] = ([0.0] if step == 0 and 0.0 in fractions else []) + \
                ([] if step == 0 else self._fractions_due()) + ([1.0] if final and 1.0 in fractions else [])
            self._fractions_done.update(rec["budget_fractions"])
        self.meter.add_time("eval", rec["time"], step=False)
        if self.is_main:
            rundir.append_jsonl(self.run_dir / "eval.jsonl", rec)
        for lg in self.loggers:
            lg.log(step, {f"eval/{k}": v for k, v in rec.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
        return rec

    def write_cost(self) -> dict:
        return self.meter.write(self.run_dir, self.is_main, n_params=self.n_params, n_critic=self.n_critic,
                                device=self.device, steps_done=self.step_done)

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        critic = setup.unwrap(self.accelerator, self.critic, self.zero is not None) if self.critic is not None else None
        return self.checkpoints.save(
            step, model_state=self.weights.state_dict, critic_state=lambda: critic.state_dict() if critic else None,
            state=lambda: {"optimizer": None if self.zero else self.optimizer.state_dict(),
                           "scheduler": self.scheduler.state_dict(), "algorithm": self.algorithm.state_dict(),
                           **self.meter.state_dict(), "nonfinite_streak": self.faults.streak,
                           "pending_rollouts": self.sampler.pending(step)},
            zero=self.zero, refresh=self.weights.refresh)

    def _resume(self) -> list:
        """Continue from the newest checkpoint that loads; records written after it are dropped.
        Returns the batches it holds for the next steps (asynchronous rollouts)."""
        loaded = self.checkpoints.newest_loadable(self.critic is not None, self.zero.signature() if self.zero else None)
        if loaded is None:
            self.checkpoints.drop_records_after(0)
            return []
        critic = setup.unwrap(self.accelerator, self.critic, self.zero is not None) if self.critic is not None else None
        restore(loaded, Restorable(self.policy, self.optimizer, self.scheduler, critic, self.algorithm, self.zero))
        self.meter.load_state_dict(loaded.state)
        self.faults.streak = loaded.state.get("nonfinite_streak", 0)
        self.step_done = loaded.state["step"]
        self.weights.refresh()  # ZeRO-3: the whole copy the engine is built from
        self.checkpoints.drop_records_after(self.step_done)
        return loaded.state.get("pending_rollouts") or []

    def close(self) -> None:
        """Release the engine (vLLM's memory and temporary model directory)."""
        self.sampler.close()


def finished(run_dir: Path, cfg: cfgmod.Config) -> str | None:
    """Why the run in ``run_dir`` has nothing left to do under ``cfg`` (its cost.json, written only
    when a run completes, says it reached ``train.steps`` or a budget ``cfg`` still sets), or None."""
    path = Path(run_dir) / "cost.json"
    if not path.is_file():
        return None
    cost = json.loads(path.read_text())
    done = int(cost.get("steps_done", 0))
    if done >= cfg.train.steps:
        return f"it finished at step {done} (train.steps = {cfg.train.steps})"
    limits = {"flops": cfg.train.max_flops, "device_seconds": cfg.train.max_device_seconds,
              "tokens": cfg.train.max_generated_tokens}
    spent = cost.get("spent") or {}
    for k, limit in limits.items():
        if limit > 0 and float(spent.get(k, 0.0)) >= limit:
            return f"its {k} budget ({limit:g}) was spent at step {done}"
    return None


def start(cfg: cfgmod.Config, run_dir: Path, resume: bool = False) -> Trainer:
    """Create the run directory (config.yaml, manifest.json) and a ready Trainer."""
    run_dir = Path(run_dir)
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise TrainingError(f"run directory {run_dir} already holds a run; use --resume {run_dir} or another --out/--set run.name")
    if not resume:  # the task's data, templates and gold answers, before any model loads
        task_check.preflight(cfg, echo=dist.launch_rank() == 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and dist.launch_rank() == 0:
        cfgmod.dump(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg, run_dir, resume=resume)
    if trainer.is_main and (not resume or not (run_dir / "manifest.json").is_file()):  # or killed before writing it
        # the task's options and, for a task reading the user's files, their contents' hashes
        files = getattr(trainer.task, "files", {})
        hashed = [cfg.to_dict()["task"], files] if files else cfg.to_dict()["task"]
        data_hash = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
        man = rundir.manifest(
            config=cfg.to_dict(), model_hash=trainer.model_hash, data_hash=data_hash, device=str(trainer.device),
            engine=cfg.names["engine"], seed=cfg.run.seed, engine_requested=cfg.names.get("engine_requested"))
        man["plugins"] = {sec: manager.provenance(kind, cfg.names[sec]) for sec, kind in cfgmod.PLUGIN_SECTIONS.items()}
        if cfg.env is not None and cfg.env.name:
            man["plugins"]["env"] = manager.provenance("environment", cfg.env.name)
        man["world_size"] = trainer.world
        man["batch_invariant_sampling"] = trainer.batch_invariant  # resolved (auto -> on / off)
        man["determinism"] = rundir.determinism_tier(getattr(trainer.engine, "determinism", "none"), str(trainer.device),
                                                     trainer.world, cfg.rollout.off_policy_steps)
        if trainer.ref_quant:
            man["reference_quantization"] = trainer.ref_quant
        info = getattr(trainer.task, "manifest_info", None)
        if info:
            man["task_info"] = info()  # e.g. the code sandbox's isolation level
        rundir.write_json(run_dir / "manifest.json", man)
    return trainer
