"""The training loop: rollouts → rewards → algorithm → Accelerate update → sync.

One step, top to bottom (``Trainer.step``):
  1. B prompts from the task's train split (seeded by run seed and step: the
     data position is the step number, so resuming needs no sampler state);
  2. the engine samples G completions per prompt;
  3. the task scores them (named components, summed into the reward);
  4. the algorithm turns rollouts + rewards into a TrainBatch;
  5. the trainer adds what the algorithm needs: reference logprobs (no-grad,
     batched), old logprobs when μ > 1;
  6. μ optimizer steps, each over micro-batches with gradient accumulation
     (the algorithm's loss shares are normalised by whole-batch totals, so
     micro-batching does not change the loss or gradient), clipping, AdamW,
     warmup + cosine schedule;
  7. the engine syncs to the new weights.
Held-out evaluation (greedy pass@1 and the exact KL to the reference on the
policy's own greedy completions, the same for every algorithm) runs before,
every ``eval.every`` steps and after training.

Faults: a step whose rewards, loss or gradient norm is NaN/inf applies no update
(counted, its batch saved under faults/), ``train.max_nonfinite_steps`` in a row
stop the run; a failed generate call is retried on halves of the batch, a dead
engine is rebuilt from the current policy; prompts too long for the context are
skipped or truncated and counted; SIGINT/SIGTERM finish the current step, write a
checkpoint and return; checkpoints are written to a temporary directory, fsynced
and renamed, and resume falls back to an older one if the newest does not load.

Several processes (``accelerate launch``): each rank samples a shard of the step's prompts;
loss normalisers and gradients are summed over ranks (rlbench/dist.py); rank 0 writes.

DeepSpeed ZeRO-2/3 (an accelerate config with ``distributed_type: DEEPSPEED``): the DeepSpeed engine
reduces, clips and steps (rlbench/zero.py); under ZeRO-3 the engine and the no-grad policy passes
use a whole copy gathered after every update.

Not covered: tensor/pipeline parallelism; a critic (PPO) or ZeRO-3 LoRA under DeepSpeed; DeepSpeed
checkpoints resumed at another world size (DeepSpeed's universal checkpoints are not wired in).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rlbench import config as cfgmod
from rlbench import logprobs as lpmod
from rlbench import dist, manager, models, ops, rundir
from rlbench.types import Rollouts, Sampling, StepContext, TrainBatch


class TrainingError(RuntimeError):
    pass


class NonFiniteError(TrainingError):
    """NaN/inf in the rewards, the loss or the gradients of a step: the step applies no
    (further) update; ``payload`` is what is saved under faults/ for inspection."""

    def __init__(self, where: str, step: int, detail: str = "", payload: dict | None = None):
        super().__init__(f"non-finite {where} at step {step}{': ' + detail if detail else ''}")
        self.where, self.step, self.payload = where, step, payload or {}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def split_micro_batches(batch: TrainBatch, micro_batch_size: int, pairs: bool = False,
                        share_prompts: bool = True) -> list[TrainBatch]:
    """The micro-batches ``accumulate_gradients`` runs, in order."""
    if pairs:  # keep (chosen, rejected) rows together: original order, an even micro-batch size
        return list(batch.split(max(2, micro_batch_size - micro_batch_size % 2)))
    if share_prompts:  # a group's rows together (one prompt forward each), similar prompt lengths together
        return list(batch.sorted_by_length(prompt_only=True).split(micro_batch_size))
    return list(batch.sorted_by_length().split(micro_batch_size))  # similar lengths together: less padding


def accumulate_gradients(model, algorithm, batch: TrainBatch, micro_batch_size: int, ctx: StepContext,
                         backward=None, is_cap: float | None = None, pairs: bool = False,
                         critic=None, share_prompts: bool = True, pad_to: int | None = None,
                         sampler_logprobs: torch.Tensor | None = None) -> dict[str, float]:
    """Forward + backward over micro-batches; gradients accumulate in ``.grad``.

    ``ctx`` holds the step's per-row tensors for the rollouts rows that ``batch["row"]`` indexes
    (``TrainBatch.rows``); each micro-batch's loss gets the context of its own rows
    (``StepContext.select``), plus the critic's current values (``critic``) and the importance
    weights (``is_cap``). Returns the batch's loss and the algorithm's metrics (summed shares),
    the trainer's own ``kl`` (mean k3 to the reference over completion tokens, when reference
    logprobs are present), ``entropy``, and, given ``sampler_logprobs`` [rows, C] (the engine's,
    aligned like ``ctx``), the sync drift: the largest and mean |trainer − sampler| logprob of the
    sampled tokens (``sync/logprob_drift``, ``sync/logprob_drift_mean``). With ``is_cap`` set,
    the algorithm gets per-token truncated importance weights min(π_θ/π_sampler, is_cap) as
    ``ctx.is_weights``. A micro-batch whose loss is NaN/inf gets no backward and is counted as
    ``nonfinite_loss`` (the caller skips the update).

    ``pad_to`` (DeepSpeed, where every backward is a collective): every micro-batch gets a
    backward, non-finite ones included (``backward`` decides what to do with them), and the last
    micro-batch is run again with a zero loss until ``pad_to`` backwards were made, so all ranks
    make the same number."""
    backward = backward or (lambda loss: loss.backward())
    totals: dict[str, float] = {"loss": 0.0}
    kl_sum = ent_sum = drift_sum = is_sum = 0.0
    drift_max = 0.0
    if "row" not in batch:  # a batch built by hand: rows 0..N−1 of the context
        batch = TrainBatch({**batch.tensors, "row": batch.rows()}, batch.totals, batch.metrics)
    micro_batches = split_micro_batches(batch, micro_batch_size, pairs, share_prompts)
    n_real = len(micro_batches)
    micro_batches += micro_batches[-1:] * max(0, (pad_to or 0) - n_real)
    for j, micro in enumerate(micro_batches):
        micro = micro.trimmed()
        C = micro["completion_mask"].shape[1]
        mctx = ctx.select(micro["row"], C)
        logp, ent = lpmod.token_logprobs(model, micro["input_ids"], micro["attention_mask"], C, with_entropy=True,
                                         share_prompts=share_prompts)
        mask = micro["completion_mask"]
        if sampler_logprobs is not None:
            sampler = sampler_logprobs[micro["row"].to(sampler_logprobs.device)][:, :C].to(logp.device)  # [n, C]
            gap = (logp.detach() - sampler) * mask  # [n, C]
            drift_max = max(drift_max, gap.abs().max().item())
            drift_sum += gap.abs().sum().item()
            if is_cap is not None:
                w = torch.exp(gap).clamp(max=is_cap) * mask  # [n, C]
                mctx.is_weights = w
                is_sum += w.sum().item()
        if critic is not None:  # the value model's predictions, with gradient, for the algorithm's value loss
            mctx.values = critic(micro["input_ids"], micro["attention_mask"], C)  # [n, C]
        loss, metrics = algorithm.loss(logp, micro, mctx)
        if j >= n_real:  # padding: a backward that adds nothing
            backward(loss * 0.0)
            continue
        if not torch.isfinite(loss):  # no backward (or DeepSpeed's); the trainer skips the update (on every rank)
            totals["nonfinite_loss"] = totals.get("nonfinite_loss", 0.0) + 1.0
            totals.setdefault("nonfinite_value", loss.item())
            if pad_to is not None:
                backward(loss)
            continue
        backward(loss)
        totals["loss"] += loss.item()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        ent_sum += (ent * mask).sum().item()
        if mctx.ref_logprobs is not None:
            kl_sum += (ops.k3_kl(logp.detach(), mctx.ref_logprobs) * mask).sum().item()
    totals["entropy"] = ent_sum / batch.totals["tokens"]
    if sampler_logprobs is not None:
        totals["sync/logprob_drift"] = drift_max
        totals["sync/logprob_drift_mean"] = drift_sum / batch.totals["tokens"]
        if is_cap is not None:
            totals["is/weight_mean"] = is_sum / batch.totals["tokens"]
    if ctx.ref_logprobs is not None:
        totals["kl"] = kl_sum / batch.totals["tokens"]
    return totals


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.random.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Trainer:
    def __init__(self, cfg: cfgmod.Config, run_dir: str | Path, resume: bool = False):
        from accelerate import Accelerator

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        use_cuda = torch.cuda.is_available()
        dtype = models.resolve_dtype(cfg.model.dtype, torch.device("cuda" if use_cuda else "cpu"))
        mixed = use_cuda and dtype == torch.bfloat16
        # cpu=True would quietly turn a DeepSpeed launch into plain data parallel (accelerate 1.x)
        use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        self.accelerator = Accelerator(cpu=not use_cuda and not use_deepspeed, mixed_precision="bf16" if mixed else "no")
        weights_dtype = torch.float32 if cfg.model.dtype == "auto" else dtype  # auto on GPU: fp32 master + bf16 autocast
        self.device = self.accelerator.device
        # Data parallel (accelerate launch): each rank samples a contiguous shard of the step's prompts.
        # Rank and world from torch.distributed: under DeepSpeed on CPU accelerate reports index 0 on every rank.
        self.rank, self.world = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        if cfg.rollout.prompts_per_step % self.world:
            raise cfgmod.ConfigError(f"config: rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple "
                                     f"of the number of processes ({self.world}): groups are never split across ranks")
        _seed_all(cfg.run.seed)

        self.times: dict[str, float] = {}
        t0 = time.perf_counter()
        policy, self.tok = models.load(cfg.model.name, seed=cfg.run.seed, dtype=weights_dtype,
                                       tiny_layers=cfg.model.tiny_layers, tiny_hidden=cfg.model.tiny_hidden,
                             tiny_init_std=cfg.model.tiny_init_std)
        self.n_params = sum(p.numel() for p in policy.parameters())
        self.n_critic = 0
        self.model_hash = rundir.tensor_hash(sorted(policy.state_dict().items())[:4])
        # The frozen reference: a separate copy (or its 8/4-bit quantisation), never handed to the optimizer.
        self.ref_quant: dict | None = None
        if cfg.model.reference_quantization != "none":
            self.reference = models.quantized_copy(policy, cfg.model.reference_quantization, self.device)
        else:
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False).to(self.device)
        self.lora = cfg.model.lora_rank > 0
        if self.lora:
            from rlbench import lora

            policy = lora.apply(policy, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout,
                                cfg.model.lora_targets)
        if cfg.train.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            policy.config.use_cache = False
        self.times["load"] = time.perf_counter() - t0

        self.task = manager.get("task", cfg.names["task"])(cfg.task, self.tok)
        algo_cls = manager.get("algorithm", cfg.names["algorithm"])
        self.algorithm = algo_cls(cfg.algorithm)
        self.needs = algo_cls.needs(cfg.algorithm)
        if cfg.rollout.group_size < self.needs.group_size:
            raise cfgmod.ConfigError(f"config: rollout.group_size={cfg.rollout.group_size} but algorithm "
                                     f"{cfg.names['algorithm']!r} needs at least {self.needs.group_size}")

        if self.lora and self.needs.critic:
            raise cfgmod.ConfigError("config: model.lora_rank with an algorithm that trains a critic (ppo) is not supported")
        self.zero = None  # DeepSpeed ZeRO-2/3 (rlbench/zero.py)
        if use_deepspeed:
            from rlbench.zero import Zero

            self.zero = Zero(self.accelerator, cfg.train, policy, self.device, critic=self.needs.critic, lora=self.lora)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.train.lr}]
        critic = None
        if self.needs.critic:  # initialised from the policy; trained by the same optimizer, its own lr
            from rlbench.critic import ValueModel

            if self.needs.critic_model:
                body, ctok = models.load(self.needs.critic_model, seed=cfg.run.seed + 1, dtype=weights_dtype)
                if ctok.get_vocab() != self.tok.get_vocab():
                    raise cfgmod.ConfigError(f"config: algorithm critic_model {self.needs.critic_model!r} has a different "
                                             f"tokenizer from the policy {cfg.model.name!r}; the critic reads the policy's tokens")
                critic = ValueModel(body, copy_body=False)
            else:
                critic = ValueModel(policy)
            groups.append({"params": list(critic.parameters()), "lr": self.needs.critic_lr or cfg.train.lr})
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))
        total = cfg.train.steps * self.needs.epochs * self.needs.mini_batches  # optimizer steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.warmup_steps, total, cfg.train.min_lr_ratio))
        # The scheduler stays unprepared: accelerate's wrapper would step it once per process per call.
        self.model, self.optimizer = self.accelerator.prepare(policy, opt)
        self.scheduler = sched
        if self.zero:
            self.zero.engine = self.model
        self.critic = self.accelerator.prepare(critic) if critic is not None else None
        if critic is not None:
            self.n_critic = sum(p.numel() for p in critic.parameters())
        self.engine = manager.get("engine", cfg.names["engine"])(cfg.engine, self.engine_model(), self.tok,
                                                                 self.device, seed=cfg.run.seed)
        self.max_drift = cfg.rollout.max_logprob_drift or (2.0 if use_cuda else 1e-3)

        self.step_done = 0
        self.counters = {"tokens/generated": 0.0, "tokens/trained": 0.0, "tokens/reference": 0.0,
                         "tokens/old_logprobs": 0.0, "tokens/critic": 0.0, "nonfinite/skipped": 0.0,
                         "grad/clipped": 0.0, "prompts/skipped": 0.0, "prompts/truncated": 0.0,
                         "engine/retries": 0.0, "engine/restarts": 0.0}
        self.nonfinite_streak = 0  # consecutive skipped steps
        self.stop_signal: int | None = None  # SIGINT / SIGTERM received: stop after this step
        self.sampling = Sampling(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_tokens)
        if resume:
            self._load_latest()
        if cfg.model.reference_quantization != "none":
            self.ref_quant = self._reference_quantization_error(resume)
        self.loggers = [manager.get("logger", name)(self.run_dir, cfg) for name in cfg.logging.loggers] \
            if self.is_main else []
        self._pending: dict[str, float] = {}  # this rank's counter increments, summed over ranks once per step

    @property
    def policy(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def whole_policy(self):
        """The policy with whole weights for no-grad passes (ZeRO-3: the gathered copy)."""
        return self.zero.full_copy if self.zero and self.zero.full_copy is not None else self.policy

    def engine_model(self):
        """A plain model with the current weights to build an engine from (LoRA: adapters merged;
        ZeRO-3: the gathered copy)."""
        if self.lora:
            from rlbench import lora

            return lora.merged_copy(self.policy)
        return self.whole_policy

    def sync_engine(self) -> None:
        """Hand the engine the current weights (LoRA: merged on the fly, rlbench/lora.py; ZeRO-3:
        gathered from the shards into the whole copy first)."""
        if self.lora:
            from rlbench import lora

            self.engine.sync(lora.MergedView(self.policy))
        else:
            if self.zero:
                self.zero.refresh(self.policy)  # ZeRO-3: gathered from the shards (a collective)
            self.engine.sync(self.whole_policy)

    @torch.no_grad()
    def _reference_quantization_error(self, resume: bool) -> dict:
        """|Δ token logprob| between the quantised reference and full precision (the untrained
        policy) on greedy completions of up to 32 held-out problems; on resume, the start's figure."""
        if resume:
            man = self.run_dir / "manifest.json"
            if man.is_file():
                return json.loads(man.read_text()).get("reference_quantization")
        prompts = self.task.prompts("test", min(32, self.cfg.eval.n), seed=0)
        ro = self.engine.generate(prompts, 1, Sampling(max_tokens=self.cfg.eval.max_tokens, greedy=True, logprobs=False))
        inputs = {k: v.to(self.device) for k, v in ro.model_inputs().items()}
        C, mask = ro.completion_ids.shape[1], ro.completion_mask.to(self.device)
        self.model.eval()
        full = lpmod.batched_logprobs(self.whole_policy, inputs["input_ids"], inputs["attention_mask"], C,
                                      self.cfg.train.micro_batch_size)  # [n, C]
        quant = lpmod.batched_logprobs(self.reference, inputs["input_ids"], inputs["attention_mask"], C,
                                       self.cfg.train.micro_batch_size)  # [n, C]
        gap = (full - quant).abs() * mask
        tokens = mask.sum().clamp(min=1)
        return {"mode": self.cfg.model.reference_quantization, "mean_abs_logprob_error": (gap.sum() / tokens).item(),
                "max_abs_logprob_error": gap.max().item(), "tokens": int(tokens.item()), "completions": len(prompts)}

    # -- the loop ------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``train.steps`` (or the token budget). SIGINT/SIGTERM finish the current step,
        write a checkpoint and return early with ``summary["interrupted"]`` set (no cost.json,
        so suites see the run as unfinished); a second signal interrupts at once."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._stop_on_signals():
            evals = rundir.read_jsonl(self.run_dir / "eval.jsonl")
            if cfg.eval.before and self.step_done == 0 and not any(e["step"] == 0 for e in evals):
                self.evaluate(0)
            bar = None
            if cfg.logging.progress and self.is_main:
                from tqdm.auto import tqdm
                bar = tqdm(total=cfg.train.steps, initial=self.step_done, desc=cfg.run.name, unit="step")
            saved = self.step_done
            try:
                while self.step_done < cfg.train.steps and not self.budget_spent() and self.stop_signal is None:
                    step = self.step_done + 1
                    metrics = self.step(step)
                    self.step_done = step
                    self._log(step, metrics)
                    if dist.any_true(self.stop_signal is not None) and self.stop_signal is None:
                        self.stop_signal = signal.SIGTERM  # another rank was signalled: stop together
                    if bar is not None:
                        bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                        acc=f"{metrics.get('reward/accuracy', float('nan')):.3f}",
                                        kl=f"{metrics.get('kl', 0.0):.4f}")
                        bar.update(1)
                    if self.nonfinite_streak >= cfg.train.max_nonfinite_steps:
                        good = self.latest_checkpoint()
                        raise TrainingError(
                            f"{self.nonfinite_streak} steps in a row (up to step {step}) had non-finite rewards, loss or "
                            f"gradients (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopping. Their "
                            f"batches are in {self.run_dir / 'faults'}; the last good checkpoint is "
                            f"{good if good else '(none written yet)'}.")
                    last = step == cfg.train.steps or self.budget_spent()
                    if cfg.eval.every and step % cfg.eval.every == 0 and not last:
                        self.evaluate(step)
                    due = last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
                    if due and (self.nonfinite_streak == 0 or last):  # no checkpoint inside a streak of bad steps
                        self.save_checkpoint(step)
                        saved = step
            finally:
                if bar is not None:
                    bar.close()
            if self.stop_signal is not None and self.step_done < cfg.train.steps and not self.budget_spent():
                if saved != self.step_done and self.step_done > 0:
                    self.save_checkpoint(self.step_done)
                name = signal.Signals(self.stop_signal).name
                if self.is_main:
                    print(f"rlbench: {name} received: stopped after step {self.step_done}"
                          + (f", checkpoint {self.latest_checkpoint()}" if self.step_done else "")
                          + f"; continue with: rlbench run --resume {self.run_dir}", file=sys.stderr)
                for lg in self.loggers:
                    lg.close()
                return {"interrupted": name, "steps_done": self.step_done,
                        "eval": rundir.read_jsonl(self.run_dir / "eval.jsonl")}
        final = rundir.read_jsonl(self.run_dir / "eval.jsonl")
        if cfg.eval.after and not any(e["step"] == self.step_done for e in final):
            self.evaluate(self.step_done)
        summary = self.write_cost()
        summary["eval"] = rundir.read_jsonl(self.run_dir / "eval.jsonl")
        if self.is_main:
            manager.hook().rlbench_on_run_end(run_dir=str(self.run_dir), summary=summary)
        for lg in self.loggers:
            lg.close()
        return summary

    @contextmanager
    def _stop_on_signals(self):
        """SIGINT / SIGTERM set ``stop_signal`` (the loop stops after the current step); a second
        one raises KeyboardInterrupt. Only in the main thread (Python's rule for handlers)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
            self.stop_signal = signum
            print(f"rlbench: {signal.Signals(signum).name}: finishing step {self.step_done + 1}, then writing a "
                  f"checkpoint (send it again to stop at once)", file=sys.stderr)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def close(self) -> None:
        """Release the engine (vLLM's memory and temporary model directory)."""
        close = getattr(self.engine, "close", None)
        if close:
            close()

    @contextmanager
    def _timed(self, name: str):
        """Add the block's wall time to phase ``name`` (run total and this step's ``time/<name>``)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.times[name] = self.times.get(name, 0.0) + dt
            self._last[name] = self._last.get(name, 0.0) + dt

    # -- rollouts: prompt lengths and engine faults ---------------------------------
    def prompt_limit(self, max_tokens: int) -> int:
        """Longest prompt (tokens) that leaves room for a completion of ``max_tokens`` in the context."""
        if self.cfg.rollout.max_prompt_tokens:
            return self.cfg.rollout.max_prompt_tokens
        ctx = getattr(self.policy.config, "max_position_embeddings", None) or 10**9
        engine_len = getattr(self.cfg.engine, "max_model_len", None)
        if engine_len:
            ctx = min(ctx, engine_len)
        return max(1, ctx - max_tokens)

    def fit_prompts(self, prompts: list, metrics: dict, step: int, count: bool = True) -> list:
        """Apply ``rollout.long_prompts`` to prompts over ``prompt_limit`` tokens: drop them
        (skip), keep their last tokens (truncate, as TRL's max_prompt_length) or fail (error).
        Counts go into ``metrics`` (prompts/skipped, prompts/truncated) and the run counters."""
        import dataclasses

        limit = self.prompt_limit(self.cfg.rollout.max_tokens if count else self.cfg.eval.max_tokens)
        mode = self.cfg.rollout.long_prompts
        out, skipped, truncated = [], 0, 0
        for p in prompts:
            ids = self.tok(p.text, add_special_tokens=False)["input_ids"]
            if len(ids) <= limit:
                out.append(p)
            elif mode == "error":
                raise TrainingError(f"prompt {p.id!r} at step {step} has {len(ids)} tokens, more than the limit of "
                                    f"{limit} (rollout.max_prompt_tokens, or the context minus rollout.max_tokens); "
                                    f"set rollout.long_prompts to skip or truncate")
            elif mode == "skip":
                skipped += 1
            else:
                out.append(dataclasses.replace(p, text=self.tok.decode(ids[-limit:]), meta={**p.meta, "truncated": True}))
                truncated += 1
        if skipped or truncated:
            metrics["prompts/skipped"] = metrics.get("prompts/skipped", 0.0) + skipped
            metrics["prompts/truncated"] = metrics.get("prompts/truncated", 0.0) + truncated
            if count:  # training prompts only; evaluation records its own
                self._count("prompts/skipped", skipped)
                self._count("prompts/truncated", truncated)
        if not out:
            raise TrainingError(f"every prompt of step {step} is longer than {limit} tokens (rollout.max_prompt_tokens, "
                                f"or the context minus rollout.max_tokens) and rollout.long_prompts is skip")
        return out

    def generate(self, prompts: list, n: int, sampling: Sampling, step: int, depth: int = 0) -> Rollouts:
        """``engine.generate`` with recovery: out of memory → the two halves of the batch, each
        retried the same way, at most ``rollout.generate_retries`` halvings deep; any other
        failure → the engine is rebuilt from the current policy and the call repeated once."""
        retries = self.cfg.rollout.generate_retries
        try:
            return self.engine.generate(prompts, n, sampling)
        except (KeyboardInterrupt, TrainingError):
            raise
        except Exception as e:  # noqa: BLE001 - any engine failure gets one recovery path
            name = self.cfg.names["engine"]
            if _is_oom(e) and depth < retries and len(prompts) > 1:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._count("engine/retries", 1)
                print(f"rlbench: engine {name} ran out of memory on {len(prompts)} prompts at step {step}; "
                      f"retrying in halves", file=sys.stderr)
                half = (len(prompts) + 1) // 2
                return Rollouts.cat([self.generate(prompts[:half], n, sampling, step, depth + 1),
                                     self.generate(prompts[half:], n, sampling, step, depth + 1)])
            if not _is_oom(e) and depth == 0 and retries > 0:
                self._count("engine/restarts", 1)
                print(f"rlbench: engine {name} failed at step {step} ({type(e).__name__}: {e}); restarting it "
                      f"from the current policy", file=sys.stderr)
                self.restart_engine()
                try:
                    return self.engine.generate(prompts, n, sampling)
                except Exception as e2:  # noqa: BLE001
                    raise TrainingError(f"rollout engine {name!r} failed at step {step} and again after a restart "
                                        f"from the current policy: {type(e2).__name__}: {e2}") from e2
            raise TrainingError(
                f"rollout engine {name!r} failed at step {step} on {len(prompts)} prompts × {n} samples"
                + (f" after {depth} halvings of the batch" if depth else "") + f": {type(e).__name__}: {e}"
                + (" (lower rollout.prompts_per_step / group_size, the engine's batch or memory settings)"
                   if _is_oom(e) else "")) from e

    def _count(self, key: str, value: float) -> None:
        """Add to a run counter; in a multi-process run the increments of all ranks are summed
        once per step (``_flush_counts``), so every rank holds the global totals."""
        self._pending[key] = self._pending.get(key, 0.0) + float(value)

    def _flush_counts(self) -> None:
        keys = [k for k in self.counters if k.startswith(("tokens/", "prompts/", "engine/"))]  # same order on every rank
        totals = dist.sum_floats([self._pending.get(k, 0.0) for k in keys])
        for k, v in zip(keys, totals):
            self.counters[k] += v
        self._pending = {}

    def restart_engine(self) -> None:
        """Close the engine and build a new one from the current policy weights."""
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - a dead engine may fail to close; the new one matters
            print(f"rlbench: closing the failed engine raised {type(e).__name__}: {e}", file=sys.stderr)
        self.engine = manager.get("engine", self.cfg.names["engine"])(self.cfg.engine, self.engine_model(), self.tok,
                                                                      self.device, seed=self.cfg.run.seed)

    def _sample(self, step: int):
        """Rollouts and reward components for this rank's share of the step's prompts.

        The step's B prompts are drawn from the train split (seeded by run seed and step);
        rank r of W takes the contiguous shard [r·B/W, (r+1)·B/W). With the algorithm's
        ``Needs.dynamic_sampling`` = k > 0 (DAPO), prompt groups whose rewards are all equal are
        dropped and up to k extra rounds of fresh prompts are sampled until the shard is full of
        informative groups. Returns the training rollouts and rewards, everything sampled (for
        reward metrics and cost) and the sampling metrics. NaN/inf rewards on any rank raise
        NonFiniteError on every rank."""
        import dataclasses

        cfg, G = self.cfg, self.cfg.rollout.group_size
        B, W = cfg.rollout.prompts_per_step, self.world
        b = B // W  # this rank's prompts
        parts, kept_parts, metrics = [], [], {}
        kept, bad = 0, None
        for rnd in range(1 + self.needs.dynamic_sampling):
            seed = cfg.run.seed * 1_000_003 + step + rnd * 100_000_019  # round 0: the plain data position
            shard = self.task.prompts("train", B, seed=seed)[self.rank * b:(self.rank + 1) * b]
            prompts = self.fit_prompts(shard, metrics, step)
            sampling = dataclasses.replace(self.sampling, seed=seed) if cfg.rollout.batch_invariant_sampling \
                else self.sampling
            with self._timed("rollout"):
                ro = self.generate(prompts, G, sampling, step)
            with self._timed("reward"):
                expanded = [prompts[g] for g in ro.group.tolist()]
                comp = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.task.score(expanded, ro.texts).items()}
            rewards = torch.stack(list(comp.values())).sum(0)  # [N]
            if not torch.isfinite(rewards).all():
                self._count("tokens/generated", float(ro.lengths().sum().item()))
                counts = {k: int((~torch.isfinite(v)).sum()) for k, v in comp.items() if not torch.isfinite(v).all()}
                bad = (f"components {counts}", {"prompts": [p.text for p in prompts], "texts": ro.texts,
                                                "group": ro.group, "rewards": comp, "completion_ids": ro.completion_ids})
                break
            parts.append((ro, comp, rewards))
            if not self.needs.dynamic_sampling:
                break
            r = rewards.view(-1, G)  # [b, G]
            informative = ((r.max(-1).values - r.min(-1).values) > 0).nonzero().view(-1).tolist()
            take = informative[:b - kept]
            if take:
                kept_parts.append((ro.select_groups(take), r[take].reshape(-1)))
                kept += len(take)
            if kept >= b:
                break
        if dist.any_true(bad is not None):
            detail, payload = bad if bad is not None else ("on another rank", {})
            raise NonFiniteError("rewards", step, detail, payload)
        sampled = Rollouts.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        components = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        if not self.needs.dynamic_sampling:
            return sampled, parts[0][2], sampled, components, metrics
        metrics.update({"sampling/rounds": float(len(parts)), "sampling/kept_groups": float(kept),
                        "sampling/dropped_groups": float(sum(len(p[0].prompts) for p in parts) - kept)})
        if not kept_parts:  # every group uniform in every round: train on the last one (only a KL term moves)
            return parts[-1][0], parts[-1][2], sampled, components, metrics
        rollouts = Rollouts.cat([k[0] for k in kept_parts]) if len(kept_parts) > 1 else kept_parts[0][0]
        return rollouts, torch.cat([k[1] for k in kept_parts]), sampled, components, metrics

    def step(self, step: int) -> dict[str, float]:
        """One training step (``_step``); a NaN/inf in its rewards, loss or gradients skips the
        (rest of the) update: counted, the batch saved to faults/step_N.pt, a line in faults.jsonl."""
        self._updates = 0
        try:
            metrics = self._step(step)
        except NonFiniteError as e:  # raised on every rank alike (the decision is agreed on)
            self.optimizer.zero_grad(set_to_none=True)
            if self._updates:  # an earlier mini-batch of this step was applied: the engine needs it
                self.sync_engine()
            self._flush_counts()
            return self._skipped(step, e)
        self.nonfinite_streak = 0
        return metrics

    def _skipped(self, step: int, e: NonFiniteError) -> dict[str, float]:
        self.nonfinite_streak += 1
        self.counters["nonfinite/skipped"] += 1
        faults = self.run_dir / "faults"
        faults.mkdir(exist_ok=True)
        path = faults / (f"step_{step:06d}.pt" if self.world == 1 else f"step_{step:06d}.rank{self.rank}.pt")
        torch.save({"step": step, "where": e.where, "error": str(e), **e.payload}, path)
        if self.is_main:
            rundir.append_jsonl(self.run_dir / "faults.jsonl", {
                "step": step, "kind": "nonfinite", "where": e.where, "error": str(e), "batch": str(path.name),
                "optimizer_steps_applied": self._updates, "streak": self.nonfinite_streak})
            print(f"rlbench: {e}; update skipped ({self.nonfinite_streak} in a row, batch saved to {path})",
                  file=sys.stderr)
        return {"step": step, "nonfinite/skipped": 1.0, "nonfinite/skipped_total": self.counters["nonfinite/skipped"],
                **{f"time/{k}": v for k, v in self._last.items()},
                "tokens/generated_total": self.counters["tokens/generated"]}

    def _step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        self._last: dict[str, float] = {}
        ctx = StepContext(step=step)
        if self.needs.offline:  # offline data (DPO from a pairs file): no sampling, no task reward
            with self._timed("rollout"):
                rollouts, rewards = self.algorithm.offline_rollouts(step, cfg.rollout.prompts_per_step, self.tok,
                                                                    cfg.rollout.max_tokens)
            sampled, components, sample_metrics = rollouts, {}, {}
        else:
            rollouts, rewards, sampled, components, sample_metrics = self._sample(step)
        lengths = sampled.lengths()
        gen_tokens = float(lengths.sum().item()) if not self.needs.offline else 0.0
        self._count("tokens/generated", gen_tokens)  # counted before training: a skipped step still cost them
        extra = {}
        if self.is_main:  # event hooks see rank 0's shard (in a multi-process run)
            for res in manager.hook().rlbench_on_rollouts(step=step, rollouts=sampled, rewards=components,
                                                          run_dir=str(self.run_dir), config=cfg):
                extra.update(res or {})

        # Reference / old-policy logprobs come first, so prepare() may use them (KL-in-reward algorithms).
        inputs = rollouts.model_inputs()
        C = rollouts.completion_ids.shape[1]
        with self._timed("reference"):
            if self.needs.reference or self.cfg.eval.kl:
                ctx.ref_logprobs = lpmod.batched_logprobs(
                    self.reference, inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device),
                    C, cfg.train.micro_batch_size, cfg.train.share_prompt_forward).cpu()  # [N, C]
                self._count("tokens/reference", inputs["attention_mask"].sum().item())
            if self.needs.old_logprobs:
                self._count("tokens/old_logprobs", inputs["attention_mask"].sum().item())
                self.model.eval()
                ctx.old_logprobs = lpmod.batched_logprobs(
                    self.whole_policy, inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device),
                    C, cfg.train.micro_batch_size, cfg.train.share_prompt_forward).cpu()  # [N, C]
            if self.critic is not None:
                self._count("tokens/critic", inputs["attention_mask"].sum().item())
                self.critic.eval()
                with torch.no_grad():
                    ctx.values = torch.cat([
                        self.critic(inputs["input_ids"][i:i + cfg.train.micro_batch_size].to(self.device),
                                    inputs["attention_mask"][i:i + cfg.train.micro_batch_size].to(self.device), C)
                        for i in range(0, rollouts.n, cfg.train.micro_batch_size)]).cpu()  # [N, C]
        ctx.max_tokens = cfg.rollout.max_tokens
        batch = self.algorithm.prepare(rollouts, rewards, ctx)
        if "row" not in batch and batch.size != rollouts.n:
            raise TrainingError(f"algorithm {cfg.names['algorithm']!r}: prepare() returned {batch.size} rows for "
                                f"{rollouts.n} rollouts without their 'row' index; build the batch with "
                                "TrainBatch.from_rollouts and select rows from it")
        batch, ctx = batch.to(self.device), ctx.to(self.device)

        lr = self.scheduler.get_last_lr()[0]  # the rate this step's (first) update uses
        with self._timed("train"):
            self.model.train()
            if self.critic is not None:
                self.critic.train()
            train_metrics = {}
            offload = getattr(self.engine, "offload", None)
            if offload:
                offload()
            first: list[dict] = []  # metrics of the first epoch's optimizer steps (the sampling policy's)
            for epoch in range(self.needs.epochs):
                ctx.epoch = epoch
                for i, mb in enumerate(self._mini_batches(batch, step, epoch)):
                    self.optimizer.zero_grad(set_to_none=True)
                    mb = self._global_totals(mb)
                    params = [p for p in self.model.parameters()] + (list(self.critic.parameters()) if self.critic else [])
                    pad_to, backward = None, self.accelerator.backward
                    if self.zero:  # the same number of backwards on every rank
                        n_micro = len(split_micro_batches(mb, cfg.train.micro_batch_size, self.needs.pairs,
                                                          cfg.train.share_prompt_forward))
                        pad_to = int(dist.max_floats([float(n_micro)])[0])
                        backward = self.zero.backward_fn(pad_to)
                    with self._no_sync():  # gradients are summed over ranks once, below
                        m = accumulate_gradients(self.model, self.algorithm, mb, cfg.train.micro_batch_size, ctx,
                                                 backward=backward,
                                                 is_cap=cfg.rollout.is_cap if cfg.rollout.is_correction else None,
                                                 pairs=self.needs.pairs, critic=self.critic,
                                                 share_prompts=cfg.train.share_prompt_forward, pad_to=pad_to,
                                                 sampler_logprobs=rollouts.logprobs)
                    m = self._reduce_train_metrics(m)
                    fault = lambda: self._fault_payload(rollouts, rewards, mb, epoch, i)  # noqa: E731
                    if self.zero:  # DeepSpeed clips and steps, or discards NaN/inf gradients
                        if epoch == 0 and i == 0:
                            self._check_drift(m, step)
                        t_opt = time.perf_counter()
                        grad_norm, applied = self.zero.step()
                        if m.get("nonfinite_loss", 0.0) > 0:
                            raise NonFiniteError("loss", step, f"{m.get('nonfinite_value', float('nan'))}", fault())
                        if not applied or not math.isfinite(grad_norm):
                            raise NonFiniteError("gradient norm", step, f"{grad_norm}", fault())
                    else:
                        if m.get("nonfinite_loss", 0.0) > 0:
                            raise NonFiniteError("loss", step, f"{m.get('nonfinite_value', float('nan'))}", fault())
                        dist.sum_gradients(params)
                        if epoch == 0 and i == 0:
                            self._check_drift(m, step)
                        t_opt = time.perf_counter()
                        grad_norm = float(self.accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm))
                        if not math.isfinite(grad_norm):
                            raise NonFiniteError("gradient norm", step, f"{grad_norm}", fault())
                        self.optimizer.step()
                    self.scheduler.step()
                    dt = time.perf_counter() - t_opt  # gradient sum over ranks excluded
                    self._last["optimizer"] = self._last.get("optimizer", 0.0) + dt  # part of time/train
                    self._updates += 1
                    self.counters["grad/clipped"] += float(grad_norm > cfg.train.max_grad_norm)
                    m["grad_norm"] = grad_norm
                    m["grad_clipped"] = float(grad_norm > cfg.train.max_grad_norm)
                    if epoch == 0:
                        first.append(m)
            # KL / entropy / loss of the sampling policy as every algorithm logs them: the mean over the
            # first epoch's mini-batches; the sync drift from the first one only (later ones follow an update).
            train_metrics = {k: sum(m.get(k, 0.0) for m in first) / len(first) for k in first[0]}
            train_metrics.update({k: v for k, v in first[0].items() if k.startswith("sync/")})
            self._count("tokens/trained", batch["attention_mask"].sum().item() * self.needs.epochs)
        with self._timed("sync"):
            self.sync_engine()  # every optimizer step: the next rollouts use the new weights

        if self.world > 1:  # reward and length statistics over every rank's completions
            parts = dist.gather_objects(({k: v.tolist() for k, v in components.items()}, lengths.tolist(),
                                         list(sampled.finish_reasons)))
            components = {k: torch.tensor([x for p in parts for x in p[0][k]]) for k in components}
            lengths = torch.tensor([x for p in parts for x in p[1]])
            finish = [f for p in parts for f in p[2]]
            batch_metrics = {k: v / self.world for k, v in self._sum_over_ranks(batch.metrics).items()}  # mean of ranks
            rounds = dist.max_floats([sample_metrics.get("sampling/rounds", 0.0)])[0]
            sample_metrics = self._sum_over_ranks(sample_metrics)  # counts
            if "sampling/rounds" in sample_metrics:
                sample_metrics["sampling/rounds"] = rounds
            gen_tokens = float(lengths.sum().item())
        else:
            finish, batch_metrics = list(sampled.finish_reasons), batch.metrics
        trained_before = self.counters["tokens/trained"]
        self._flush_counts()
        total_reward = torch.stack(list(components.values())).sum(0) if components else None  # [N sampled]
        metrics = {
            "step": step,
            **({"reward/mean": total_reward.mean().item(),
                "reward/std": total_reward.std().item() if total_reward.numel() > 1 else 0.0} if components else {}),
            **{f"reward/{k}": v.mean().item() for k, v in components.items()},
            **train_metrics,
            **batch_metrics,
            **sample_metrics,
            "completion_len/mean": lengths.float().mean().item(),
            "completion_len/max": lengths.max().item(),
            "truncated_frac": sum(f == "length" for f in finish) / len(finish),
            "lr": lr,
            **{f"time/{k}": v for k, v in self._last.items()},
            "tokens/generated": gen_tokens,
            "tokens/generated_total": self.counters["tokens/generated"],
            "tokens/trained": self.counters["tokens/trained"] - trained_before,  # prompt + completion, all epochs
            **({"kl/ref_quant_error": self.ref_quant["mean_abs_logprob_error"]} if self.ref_quant else {}),
            # fault counters (gradient clips, skipped prompts, engine retries/restarts, skipped steps) once non-zero
            **{f"{k}_total": v for k, v in self.counters.items() if not k.startswith("tokens/") and v},
            **extra,
        }
        if self.world > 1:  # replicas must hold the same weights: a float64 checksum, compared over ranks
            with torch.no_grad():
                c = sum((p.double().sum() + p.double().square().sum()).item() for p in self.whole_policy.parameters())
            spread = dist.max_floats([c, -c])
            metrics["dist/param_checksum_spread"] = spread[0] + spread[1]  # max − min
            metrics["dist/world_size"] = float(self.world)
        metrics.update(self.algorithm.after_step(metrics))
        return metrics

    def _check_drift(self, m: dict, step: int) -> None:
        """The first update of a step must start from the weights that sampled it."""
        if m.get("sync/logprob_drift", 0.0) > self.max_drift:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"rollout weights are stale: at step {step} the sampler's logprobs differ from the policy's "
                f"by up to {m['sync/logprob_drift']:.3g} nats (mean {m['sync/logprob_drift_mean']:.3g}), "
                f"above rollout.max_logprob_drift={self.max_drift:g}. The engine is not serving the trained "
                f"weights (is engine.sync off, or did a weight sync fail?). No update was applied; the last "
                f"checkpoint is intact.")

    @contextmanager
    def _no_sync(self):
        """No DDP all-reduce on each backward (policy and critic); ``dist.sum_gradients`` does it once."""
        from contextlib import ExitStack

        with ExitStack() as stack:
            if self.world > 1 and not self.zero:
                stack.enter_context(self.accelerator.no_sync(self.model))
                if self.critic is not None:
                    stack.enter_context(self.accelerator.no_sync(self.critic))
            yield

    def _global_totals(self, mb: TrainBatch) -> TrainBatch:
        """The loss normalisers summed over ranks: each rank's loss is its share of the global batch's."""
        if self.world == 1:
            return mb
        keys = [k for k in ("seqs", "tokens", "pairs") if k in mb.totals]
        totals = dict(mb.totals)
        totals.update(zip(keys, dist.sum_floats([mb.totals[k] for k in keys])))
        return TrainBatch(mb.tensors, totals, mb.metrics)

    @staticmethod
    def _sum_over_ranks(d: dict) -> dict:
        keys = sorted(set().union(*dist.gather_objects(sorted(d))))  # ranks may hold different keys
        return dict(zip(keys, dist.sum_floats([float(d.get(k, 0.0)) for k in keys])))

    def _reduce_train_metrics(self, m: dict) -> dict:
        """accumulate_gradients' values are shares of global-batch means: summed over ranks; the
        sync drift's maximum is a maximum. Every rank sends the same keys (union, zeros filled)."""
        if self.world == 1:
            return m
        summed = self._sum_over_ranks(m)
        if "sync/logprob_drift" in summed:
            summed["sync/logprob_drift"] = dist.max_floats([m.get("sync/logprob_drift", 0.0)])[0]
        if "nonfinite_value" in summed:
            summed["nonfinite_value"] = float("nan")
        return summed

    @staticmethod
    def _fault_payload(rollouts, rewards, mb: TrainBatch, epoch: int, index: int) -> dict:
        """What faults/step_N.pt holds for a bad update: the mini-batch's tensors, the step's
        prompts, completions and rewards."""
        return {"epoch": epoch, "mini_batch": index, "tensors": {k: v.detach().cpu() for k, v in mb.tensors.items()},
                "totals": dict(mb.totals), "prompts": [p.text for p in rollouts.prompts], "texts": rollouts.texts,
                "group": rollouts.group, "rewards": rewards}

    def _mini_batches(self, batch: TrainBatch, step: int, epoch: int):
        """The whole batch, or (``Needs.mini_batches`` = M > 1) a fresh shuffle of it split into M
        parts, each with its own loss normalisers; preference pairs stay whole. The shuffle is
        seeded by (run seed, step, epoch), so a resumed run repeats it."""
        M = self.needs.mini_batches
        if M <= 1 or batch.size < 2:
            yield batch
            return
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step * 1_009 + epoch)
        if self.needs.pairs:
            pairs = torch.randperm(batch.size // 2, generator=g)  # [P]
            order = torch.stack([2 * pairs, 2 * pairs + 1], -1).reshape(-1)  # [2P] chosen, rejected, …
            chunks = [c.reshape(-1) for c in order.view(-1, 2).tensor_split(M) if len(c)]
        else:
            chunks = [c for c in torch.randperm(batch.size, generator=g).tensor_split(M) if len(c)]
        for rows in chunks:
            yield batch.select(rows.to(batch["input_ids"].device))

    def _log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        rundir.append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        for lg in getattr(self, "loggers", []):
            lg.log(step, metrics)
        manager.hook().rlbench_on_step_end(step=step, metrics=metrics)

    def budget_spent(self) -> bool:
        """``train.max_generated_tokens`` reached: every generated token counts, dynamic-sampling
        rounds included, so an algorithm cannot buy accuracy with unreported generation."""
        budget = self.cfg.train.max_generated_tokens
        return budget > 0 and self.counters["tokens/generated"] >= budget

    # -- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Greedy pass@1 on ``eval.n`` held-out problems (``rlbench.evaluation``, the same verifier
        and code path as ``rlbench eval``) plus the exact KL to the reference on those completions."""
        from rlbench.evaluation import evaluate

        ev = self.cfg.eval
        t = time.perf_counter()
        rec, rollouts = evaluate(self.engine, self.task, split="test", limit=ev.n, samples=1, max_tokens=ev.max_tokens,
                                 fit_prompts=lambda ps, m: self.fit_prompts(ps, m, step, count=False),
                                 generate=lambda ps, n, smp: self.generate(ps, n, smp, step),
                                 shard=(self.rank, self.world) if self.world > 1 else None,
                                 gather=dist.gather_objects if self.world > 1 else None)
        rec = {"step": step, **rec}
        if ev.kl:
            kl_sum, tokens = 0.0, 0.0
            if rollouts is not None:
                inputs = rollouts.model_inputs()
                self.model.eval()
                kl = lpmod.exact_kl(self.whole_policy, self.reference, inputs["input_ids"].to(self.device),
                                    inputs["attention_mask"].to(self.device), rollouts.completion_mask.to(self.device),
                                    self.cfg.train.micro_batch_size, self.cfg.train.share_prompt_forward)
                kl_sum, tokens = kl.sum().item(), rollouts.completion_mask.sum().item()
            kl_sum, tokens = dist.sum_floats([kl_sum, tokens])
            rec["kl"] = kl_sum / max(1.0, tokens)
        if self.ref_quant:
            rec["ref_quant_error"] = self.ref_quant["mean_abs_logprob_error"]
        rec["time"] = time.perf_counter() - t
        self.times["eval"] = self.times.get("eval", 0.0) + rec["time"]
        if self.is_main:
            rundir.append_jsonl(self.run_dir / "eval.jsonl", rec)
        for lg in getattr(self, "loggers", []):
            lg.log(step, {f"eval/{k}": v for k, v in rec.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
        return rec

    # -- checkpoints -------------------------------------------------------------
    # checkpoints/step_N/: model.safetensors, critic.safetensors (PPO), trainer.pt (optimizer,
    # scheduler, RNG, algorithm state, counters, phase times), state.json last. Written into
    # .tmp_step_N, every file and the directory fsynced, then renamed: a crash at any moment
    # leaves either the complete checkpoint or none. Old ones are renamed to .old_* before
    # deletion, so a half-deleted checkpoint is never mistaken for a complete one.
    def latest_checkpoint(self) -> Path | None:
        ckpts = self._complete_checkpoints()
        return ckpts[-1] if ckpts else None

    def _complete_checkpoints(self) -> list[Path]:
        return sorted(p for p in self.ckpt_dir.glob("step_*") if (p / "state.json").is_file())

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".old_{path.name}_{time.time_ns()}")
        path.rename(trash)
        rundir.fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def save_checkpoint(self, step: int) -> Path:
        """Rank 0 writes (every rank holds the same weights, optimizer state and RNG streams, so a
        checkpoint does not depend on the world size and resumes at any other); the others wait.
        DeepSpeed: the optimizer state is partitioned, so every rank also writes its part with
        ``engine.save_checkpoint`` under ``deepspeed/`` (such a checkpoint resumes only with the
        same ZeRO stage and number of processes); model.safetensors still holds whole weights."""
        final = self.ckpt_dir / f"step_{step:06d}"
        tmp = self.ckpt_dir / f".tmp_step_{step:06d}"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        if self.zero:
            self.zero.refresh(self.policy)  # ZeRO-3: gathered (a collective)
            self.zero.save(tmp / "deepspeed")
        if self.is_main:
            self._write_checkpoint(step, tmp, final)
        dist.barrier()
        return final

    def _write_checkpoint(self, step: int, tmp: Path, final: Path) -> None:
        from safetensors.torch import save_file

        save_file(models.unique_tensors(self.whole_policy.state_dict()), str(tmp / "model.safetensors"))
        if self.critic is not None:
            critic_state = self.accelerator.unwrap_model(self.critic).state_dict()
            save_file({k: v.detach().contiguous().cpu().clone() for k, v in critic_state.items()},
                      str(tmp / "critic.safetensors"))
        torch.save({"optimizer": None if self.zero else self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": _rng_state(), "algorithm": self.algorithm.state_dict(), "counters": self.counters,
                    "times": self.times, "step": step, "nonfinite_streak": self.nonfinite_streak}, tmp / "trainer.pt")
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        meta = {"step": step, "data_position": step, "files": files}
        if self.zero:
            meta["deepspeed"] = self.zero.signature()
        rundir.write_json(tmp / "state.json", meta)
        rundir.fsync_tree(tmp)
        if final.exists():  # a newer run of this step (resumed from an older checkpoint) replaces it
            self._discard(final)
        tmp.rename(final)
        rundir.fsync_dir(self.ckpt_dir)
        ckpts = self._complete_checkpoints()
        for old in ckpts[: max(0, len(ckpts) - self.cfg.train.keep_checkpoints)]:
            self._discard(old)

    def _read_checkpoint(self, ck: Path) -> tuple[dict, dict | None, dict]:
        """Load a checkpoint's files into memory (nothing applied yet); raises if one is missing,
        truncated or unreadable."""
        from safetensors.torch import load_file

        meta = json.loads((ck / "state.json").read_text())
        for name, size in (meta.get("files") or {}).items():
            actual = (ck / name).stat().st_size if (ck / name).is_file() else None
            if actual != size:
                raise TrainingError(f"{ck / name}: {actual} bytes, the checkpoint recorded {size}")
        model_sd = load_file(str(ck / "model.safetensors"))
        critic_sd = load_file(str(ck / "critic.safetensors")) if self.critic is not None else None
        state = torch.load(ck / "trainer.pt", weights_only=False)
        return model_sd, critic_sd, state

    def _load_latest(self) -> None:
        """Resume from the newest checkpoint that loads; an unreadable one is reported and the
        next older one is tried. Records written after the checkpoint are dropped."""
        if self.is_main:
            for leftover in list(self.ckpt_dir.glob(".tmp_step_*")) + list(self.ckpt_dir.glob(".old_step_*")):
                shutil.rmtree(leftover, ignore_errors=True)  # an interrupted write or deletion
        ckpts = self._complete_checkpoints()
        if not ckpts:  # killed before its first checkpoint: start again from step 0
            print(f"rlbench: no complete checkpoint under {self.ckpt_dir}; starting from step 0", file=sys.stderr)
            self._drop_records_after(0)
            return
        errors = []
        for ck in reversed(ckpts):
            try:
                model_sd, critic_sd, state = self._read_checkpoint(ck)
                break
            except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous checkpoint
                errors.append(f"{ck.name}: {type(e).__name__}: {e}")
                print(f"rlbench: checkpoint {ck} does not load ({type(e).__name__}: {e}); trying an older one",
                      file=sys.stderr)
        else:
            raise TrainingError(f"no checkpoint under {self.ckpt_dir} loads: " + "; ".join(errors))
        meta = json.loads((ck / "state.json").read_text())
        written = meta.get("deepspeed")
        here = self.zero.signature() if self.zero else None
        if written != here:
            def what(d):
                return f"with DeepSpeed ZeRO-{d['zero_stage']} on {d['world_size']} processes" if d else "without DeepSpeed"
            raise TrainingError(f"checkpoint {ck} was written {what(written)} and this run is {what(here)}: "
                                "resume it with the accelerate config and number of processes it was written with (DeepSpeed "
                                "keeps the optimizer state partitioned per rank)")
        if self.zero:  # weights and the partitioned optimizer state, each rank its part
            if not self.zero.load(ck / "deepspeed"):
                raise TrainingError(f"checkpoint {ck}: DeepSpeed could not load {ck / 'deepspeed'}")
        else:
            missing, unexpected = self.policy.load_state_dict(model_sd, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise TrainingError(f"checkpoint {ck} does not match the model: missing={missing} unexpected={unexpected}")
            self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            self.accelerator.unwrap_model(self.critic).load_state_dict(critic_sd)
        self.scheduler.load_state_dict(state["scheduler"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.counters.update(state["counters"])
        self.times = state["times"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        _set_rng_state(state["rng"])
        self.step_done = state["step"]
        self.sync_engine()
        self._drop_records_after(self.step_done)

    def _drop_records_after(self, step: int) -> None:
        """Records written after the checkpoint resumed from belong to the lost future: drop them."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "eval.jsonl", "faults.jsonl"):
            rundir.truncate_jsonl(self.run_dir / name, lambda r: r.get("step", 0) <= step)

    # -- cost ------------------------------------------------------------------------
    def write_cost(self) -> dict:
        import yaml

        wall = sum(v for k, v in self.times.items())
        # 2N per token of a forward pass, 6N of forward + backward (Kaplan et al.); the critic's own
        # parameters for its value pass and its training
        N, Nc = self.n_params, self.n_critic
        c = self.counters
        flops = (2 * N * (c["tokens/generated"] + c["tokens/reference"] + c.get("tokens/old_logprobs", 0.0))
                 + 6 * (N + Nc) * c["tokens/trained"] + 2 * Nc * c.get("tokens/critic", 0.0))
        on_gpu = self.device.type == "cuda"
        cores = torch.get_num_threads()
        hours = wall / 3600
        price_file = Path(__file__).resolve().parent.parent / "configs" / "prices.yaml"
        prices = yaml.safe_load(price_file.read_text()) if price_file.exists() else {}
        if on_gpu:
            gpu = torch.cuda.get_device_name(0)
            rate = next((v for k, v in (prices.get("gpu_hour") or {}).items() if k.lower() in gpu.lower()), None)
            device_hours, price = hours, (hours * rate if rate is not None else None)
            peak_dev = torch.cuda.max_memory_allocated() / 2**30
        else:
            rate = (prices.get("cpu_core_hour") or 0.0)
            device_hours, price, peak_dev = hours * cores, hours * cores * rate, None
        cost = {
            "wall_seconds": {k: round(v, 3) for k, v in self.times.items()},
            "wall_seconds_total": round(wall, 3),
            "tokens_generated": self.counters["tokens/generated"],
            "tokens_trained": self.counters["tokens/trained"],
            "tokens_reference": self.counters["tokens/reference"],
            "tokens_old_logprobs": self.counters.get("tokens/old_logprobs", 0.0),
            "tokens_critic": self.counters.get("tokens/critic", 0.0),
            "flops_estimate": flops,
            "params": N,
            "params_critic": Nc,
            "device": str(self.device),
            "device_hours": device_hours,
            "device_hours_unit": "gpu-hours" if on_gpu else "cpu-core-hours",
            "price_usd": price,
            "peak_host_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_device_memory_gb": peak_dev,
            "steps_done": self.step_done,
            "stopped_by": "token_budget" if self.budget_spent() else "steps",
        }
        if self.is_main:
            rundir.write_json(self.run_dir / "cost.json", cost)
        return cost


def start(cfg: cfgmod.Config, run_dir: Path, resume: bool = False) -> Trainer:
    """Create the run directory (config.yaml, manifest.json) and a ready Trainer."""
    run_dir = Path(run_dir)
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise TrainingError(f"run directory {run_dir} already holds a run; use --resume {run_dir} or another --out/--set run.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and dist.launch_rank() == 0:
        cfgmod.dump(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg, run_dir, resume=resume)
    if trainer.is_main and (not resume or not (run_dir / "manifest.json").is_file()):  # or killed before writing it
        import hashlib
        import json

        data_hash = hashlib.sha256(json.dumps(cfg.to_dict()["task"], sort_keys=True).encode()).hexdigest()[:16]
        man = rundir.manifest(
            config=cfg.to_dict(), model_hash=trainer.model_hash, data_hash=data_hash, device=str(trainer.device),
            engine=cfg.names["engine"], seed=cfg.run.seed, engine_requested=cfg.names.get("engine_requested"))
        man["world_size"] = trainer.world
        if trainer.ref_quant:
            man["reference_quantization"] = trainer.ref_quant
        info = getattr(trainer.task, "manifest_info", None)
        if info:
            man["task_info"] = info()  # e.g. the code sandbox's isolation level
        rundir.write_json(run_dir / "manifest.json", man)
    return trainer
