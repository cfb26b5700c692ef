"""Asynchronous rollouts: ``rollout.off_policy_steps`` = k ≥ 1.

A background thread owns the engine and generates the next batches while the trainer trains on
the current one. The lag is fixed, not "whatever finished first": with version v = the weights
after step v (v = 0: the initial ones), the batch trained at step t is generated from version
max(0, t − 1 − k), so the trainer (at version t − 1 when step t starts) is k updates ahead of the
behaviour policy (``offpolicy/lag``; fewer during the first k steps). Synchronous training
(k = 0) samples step t from version t − 1.

  * After every step the trainer pushes its weights as a new version (``sync``): a copy the
    worker alone reads (a pool of plain modules, so the hf engine samples from a copy that no
    optimizer step changes). The worker applies version v right before the first batch that needs
    it, then checks the push: the engine generates greedy completions of fixed probe prompts and
    the pushed weights score the same tokens through the trainer's logprob code; a drift above
    ``rollout.max_logprob_drift`` is the "rollout weights are stale" error, raised by the trainer
    at the step that would have trained on that batch (the checkpoints before it are untouched).
    The trainer's own stale-weight check (its logprobs against the sampler's on the fresh batch)
    cannot apply: those differ by design.
  * Reproducible: each batch's samples are drawn after seeding torch with (run seed, step) and
    the trainer draws no random numbers while it trains (no dropout: ``model.lora_dropout`` > 0 is
    refused with the hf engine), so a seeded hf run is bit-exact whatever the timing; vLLM keeps
    its own generator, as in synchronous runs.
  * Checkpoints: saving after step s waits for the batches s + 1 … s + k (they need only versions
    ≤ s − 1) and stores them with the checkpoint; a resumed run trains on exactly those, so every
    step appears once and the metrics equal an uninterrupted run's.
  * Held-out evaluation borrows the engine between two batches, serves it the trainer's current
    weights and gives the worker's version back afterwards.
  * Costs: each batch's rollout / reward seconds and token counts are measured by the worker and
    added to the step that trains on it; ``time/rollout_wait`` is how long the trainer waited for
    it. ``timeline.jsonl`` records when every batch was generated and every update ran.

Not covered: several processes or DeepSpeed (refused at setup), offline algorithms (nothing to
generate), the sleep mode of vLLM (the engine is busy while the trainer trains).
"""
from __future__ import annotations

import copy
import queue
import threading
import time
from collections import deque

import torch

from rlbench.modeling import logprobs as lpmod
from rlbench.modeling import lora
from rlbench.training.cost import CostMeter
from rlbench.training.faults import NonFiniteError, TrainingError, stale_weights
from rlbench.training.sampler import Sample
from rlbench.seeds import batch_seed
from rlbench.types import Sampling

PROBE_PROMPTS, PROBE_TOKENS, PROBE_SEED = 2, 8, 7_919  # the fixed sequences every push is checked on


class Version:
    """One version of the policy's weights as the engine sees it (``weights`` for the Sampler)."""

    def __init__(self, number: int, module):
        self.number, self.module = number, module

    @classmethod
    def copy_of(cls, weights, number: int, into=None) -> "Version":
        """The policy's current weights (``weights``: setup.PolicyWeights) as a plain module that
        nothing trains, reusing the module ``into`` when given."""
        policy = weights.policy
        if into is None:
            into = lora.merged_copy(policy) if weights.use_lora else copy.deepcopy(policy)
            for p in into.parameters():
                p.requires_grad_(False)
                p.grad = None
            into.eval()
        else:
            with torch.no_grad():
                into.load_state_dict(lora.merged_state_dict(policy) if weights.use_lora else policy.state_dict())
        return cls(number, into)

    def engine_copy(self):
        return self.module

    def sync(self, engine) -> None:
        engine.sync(self.module)

    def context_length(self) -> int | None:
        return getattr(self.module.config, "max_position_embeddings", None)


def check_supported(cfg, setup) -> None:
    """Refuse what asynchronous rollouts do not cover, before anything runs."""
    why = None
    if setup.world > 1:
        why = f"{setup.world} processes (one process only)"
    elif setup.zero:
        why = "DeepSpeed"
    elif setup.needs.offline:
        why = f"the offline algorithm {cfg.names['algorithm']!r} (nothing is generated)"
    elif cfg.model.lora_dropout > 0 and cfg.names["engine"] == "hf":
        why = ("model.lora_dropout > 0 with the hf engine (training would draw from the random generator the "
               "sampler uses, so runs would not be reproducible)")
    if why:
        raise TrainingError(f"rollout.off_policy_steps = {cfg.rollout.off_policy_steps} does not support {why}; "
                            "set rollout.off_policy_steps to 0")


def behavior_version(step: int, k: int) -> int:
    """The version (weights after that step) that generates the batch trained at ``step``."""
    return max(0, step - 1 - k)


class AsyncRollouts:
    """The trainer's sampler when ``rollout.off_policy_steps`` > 0 (see the module docstring):
    ``sample(step)``, ``sync()``, ``pending()``, ``evaluation()``, ``close()``."""

    def __init__(self, sampler, weights, lag: int, steps: int, max_drift: float, pending: list | None = None,
                 timeline=None):
        """``sampler``: a Sampler whose engine was built from a ``Version`` (its ``weights``); ``lag``:
        ``rollout.off_policy_steps``; batches are generated up to step ``steps`` (``train.steps``)."""
        self.sampler, self.weights, self.meter = sampler, weights, sampler.meter
        self.k, self.steps, self.max_drift, self.timeline = lag, steps, max_drift, timeline
        self.current: Version = sampler.weights  # what the engine serves
        step_done = self.current.number
        self.version = step_done  # the trainer's: pushed versions are numbered by the step that made them
        self.ready: dict[int, object] = {}  # step -> Sample (or the exception that stopped the worker)
        for s in pending or []:
            self.ready[s.step] = s
        self.next = step_done + 1 + len(self.ready)  # the worker's next batch
        self.pushes: queue.Queue = queue.Queue()
        self.free: deque = deque()  # retired version modules, reused by the next push
        self.lock = threading.Lock()  # the engine: one batch or one evaluation at a time
        self.cond = threading.Condition()  # guards ready
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.probe = None  # the probe prompts, fixed at the first push
        self.probed: dict = {}  # the last push's check, reported with the first batch generated after it

    @property
    def engine(self):
        return self.sampler.engine

    # -- the trainer's side ------------------------------------------------------------------------
    def sample(self, step: int):
        """The batch for ``step``: waits for the worker; its costs go to the trainer's meter."""
        self._start()
        t = time.perf_counter()
        item = self._take(step)
        waited = time.perf_counter() - t
        meter = self.meter
        costs = getattr(item, "costs", None) or {"times": {}, "counts": {}}
        for name, seconds in costs["times"].items():  # overlapped with training: this step's figure only
            meter.add_time(name, seconds, run=False)
        for key, value in costs["counts"].items():
            meter.count(key, value)
        meter.add_time("rollout_wait", waited)  # the wall time the trainer spent waiting for it
        if isinstance(item, BaseException):
            raise item
        item.metrics["offpolicy/lag"] = float(step - 1 - item.version)
        return item

    def sync(self, changed: bool = True) -> None:
        """Push the trainer's weights after a step (every step is a version, applied or not)."""
        self.version += 1
        version = Version.copy_of(self.weights, self.version, self.free.popleft() if self.free else None)
        self.pushes.put(version)

    def pending(self, step_done: int) -> list:
        """The batches step_done + 1 … step_done + k, generated (a checkpoint stores them)."""
        self._start()
        last = min(step_done + self.k, self.steps)
        out = []
        for s in range(step_done + 1, last + 1):
            item = self._peek(s)
            if isinstance(item, BaseException):
                break
            out.append(item)
        return out

    def evaluation(self):
        """A context: the sampler with the engine serving the trainer's current weights."""
        rollouts = self

        class _Borrow:
            def __enter__(self):
                rollouts.lock.acquire()
                rollouts.weights.sync(rollouts.sampler.engine)
                return rollouts.sampler

            def __exit__(self, *exc):
                try:
                    rollouts.current.sync(rollouts.sampler.engine)
                finally:
                    rollouts.lock.release()
        return _Borrow()

    def offload(self) -> None:  # the engine keeps generating while the trainer trains
        pass

    def close(self) -> None:
        self.stop.set()
        self.pushes.put(None)
        if self.thread is not None:
            self.thread.join(timeout=600)
        self.sampler.close()

    # -- internals -----------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="rlbench-rollouts", daemon=True)
            self.thread.start()

    def _take(self, step: int):
        item = self._peek(step)
        with self.cond:
            self.ready.pop(step, None)
        return item

    def _peek(self, step: int):
        with self.cond:
            while step not in self.ready:
                if self.thread is not None and not self.thread.is_alive() and step not in self.ready:
                    return TrainingError(f"the rollout worker stopped before batch {step}")
                self.cond.wait(timeout=1.0)
            return self.ready[step]

    def _put(self, step: int, item) -> None:
        with self.cond:
            self.ready[step] = item
            self.cond.notify_all()

    def _work(self) -> None:
        j = self.next
        try:
            if j <= self.steps:  # the version the engine was built with is checked like a push
                with self.lock:
                    self._check(j)
            while not self.stop.is_set() and j <= self.steps:
                need = behavior_version(j, self.k)
                while self.current.number < need:
                    version = self.pushes.get()
                    if version is None:
                        return
                    self._apply(version, j)
                self._generate(j)
                j += 1
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, raised at the step it stops
            self._put(j, e)

    def _apply(self, version: Version, step: int) -> None:
        with self.lock:
            old = self.current
            self.current = version
            self.sampler.weights = version  # an engine rebuilt after a fault starts from this version
            self.current.sync(self.sampler.engine)
            self._check(step)
        self.free.append(old.module)

    def _check(self, step: int) -> None:
        """The probe check of the version the engine now serves; its figures go with the first
        batch generated from it (so a resumed run reports them where an uninterrupted one does)."""
        drift, mean = self._probe_drift()
        if drift > self.max_drift:
            raise stale_weights(step, drift, mean, self.max_drift)
        self.probed = {"sync/probe_drift": drift, "sync/probe_drift_mean": mean}

    @torch.no_grad()
    def _probe_drift(self) -> tuple[float, float]:
        """max and mean |engine − trainer| logprob on the probe prompts' greedy completions."""
        s = self.sampler
        if self.probe is None:
            self.probe = s.fit_prompts(s.task.prompts("train", PROBE_PROMPTS, seed=PROBE_SEED), {}, 0, count=False)
        ro = s.engine.generate(self.probe, 1, Sampling(max_tokens=PROBE_TOKENS, greedy=True, logprobs=True))
        inputs = ro.model_inputs()
        device = next(self.current.module.parameters()).device
        C = ro.completion_ids.shape[1]
        mine, _ = lpmod.token_logprobs(self.current.module, inputs["input_ids"].to(device),
                                    inputs["attention_mask"].to(device), C)
        gap = ((mine.cpu() - ro.sampler_logprobs) * ro.completion_mask).abs()  # [n, C]
        return gap.max().item(), (gap.sum() / ro.completion_mask.sum().clamp(min=1)).item()

    def _generate(self, j: int) -> None:
        meter = CostMeter()
        with self.lock:
            self.sampler.meter = meter
            torch.manual_seed(batch_seed(self.sampler.seed, j))  # this batch's samples: (seed, step) only
            start = time.time()
            try:
                sample = self.sampler.sample(j)
            except NonFiniteError as e:  # NaN rewards: the trainer skips that step, the worker goes on
                sample = e
            end = time.time()
        sample.step, sample.version = j, self.current.number
        if self.probed and isinstance(sample, Sample):
            sample.metrics.update(self.probed)
        self.probed = {}
        sample.costs = {"times": dict(meter.last), "counts": dict(meter.pending)}
        if self.timeline is not None:
            self.timeline("generate", j, start, end, version=self.current.number)
        self._put(j, sample)
