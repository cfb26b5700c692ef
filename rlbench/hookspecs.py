"""The rlbench hook specifications: the stable interface between the core and plugins.

Grouped by phase, like pytest's ``hookspec.py``. A plugin is a module (or object)
with functions named like these hooks, decorated with ``rlbench.hookimpl``; it is
found through the ``rlbench`` entry-point group (built-ins included) or registered
at run time with ``rlbench.manager.register(obj)``.

API versioning: ``API_VERSION`` below is bumped when a hook's name, arguments or
return contract change incompatibly. A plugin may declare the version it was
written against with a module attribute ``RLBENCH_API_VERSION = <int>``; the
manager refuses to load a plugin whose declared version differs, with an error
that names both versions (a plugin without the attribute is assumed current).

Registration hooks return ``{name: "package.module:Object"}`` mappings. The
strings are resolved lazily, only when a run selects that name, so that
``import rlbench`` and ``rlbench plugins`` never import vLLM, DeepSpeed or
bitsandbytes (lm-eval's registry habit). A value may also be the object itself.

What each registered object must provide is typed by the protocols of ``rlbench.types``
(``Algorithm``, ``RolloutEngine``, ``Task``, ``Logger``, ``Executor``, ``Environment``) and documented hook by
hook below; environments follow TRL's ``environment_factory`` shape (``rlbench_environments``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pluggy

if TYPE_CHECKING:  # for the annotations only: the hook interface imports nothing at run time
    import torch

    import rlbench  # the run's config is named in full (rlbench.config.Config), not imported: it stands above
    from rlbench.types import Algorithm, Environment, Executor, Logger, RolloutEngine, Rollouts, Task

API_VERSION = 2
# 2: what the trainer computes (reference / old logprobs, the critic's values, importance
#    weights) reaches an algorithm's ``loss`` through ``ctx`` (the micro-batch's rows), no longer
#    copied into the batch; batches carry ``row``; ``max_tokens`` is ``ctx.max_tokens`` only.
#    Renamed within 2 (rlbench 0.1.0, before any release): the sampler's logprobs have one name,
#    ``Rollouts.sampler_logprobs`` and ``StepContext.sampler_logprobs`` (were ``Rollouts.logprobs``
#    and ``ctx.behavior_logprobs``).

hookspec = pluggy.HookspecMarker("rlbench")

# --------------------------------------------------------------------------
# Registration: what exists. Called once when the plugin manager is built.
# --------------------------------------------------------------------------


@hookspec
def rlbench_algorithms() -> Mapping[str, str | type[Algorithm]]:
    """Register RL algorithms.

    Return ``{name: "module:Class"}``. The class has a ``Config`` dataclass (the
    options of the config's ``algorithm`` section besides ``name``), a
    ``needs(config)`` classmethod that returns ``rlbench.types.Needs`` (reference
    model, old-logprob pass, minimum group size, epochs μ and mini-batches per
    epoch, preference pairs, a critic and its model, dynamic sampling rounds,
    offline data), so the trainer loads and computes only what is needed. It is
    constructed as ``Class(config)`` and implements:

    * ``prepare(rollouts, rewards, ctx) -> TrainBatch``: ``rewards`` [N] are the
      summed task rewards; ``ctx.ref_logprobs`` / ``ctx.old_logprobs`` /
      ``ctx.values`` [N, C] are filled when needed. The batch's per-row tensors
      (advantages, returns, …) follow ``TrainBatch.from_rollouts``, whose ``row``
      index must stay with the rows if ``prepare`` selects or reorders them.
      ``prepare`` sees one rank's shard of the step's prompts in a multi-process
      run: a statistic over "the batch" (REINFORCE++'s and PPO's whitening) is per
      rank; group statistics are unaffected, since a group never spans ranks.
    * ``loss(logprobs, batch, ctx) -> (loss, metrics)`` per micro-batch:
      ``logprobs`` [n, C] carry the gradient; every logprob an algorithm sees (these,
      the reference's, the old policy's, the behaviour's) is of π_T, the distribution
      the rollouts were sampled from at ``rollout.temperature`` (T = 1 for offline
      data; rlbench/modeling/logprobs.py); ``ctx`` is the step's context for
      exactly this micro-batch's rows (reference/old logprobs, the critic's current
      values with their gradient, the importance weights of
      ``rollout.is_correction``, the behaviour logprobs of the weights that generated the
      tokens, ``max_tokens``): what the trainer computes reaches the
      algorithm through ``ctx`` only, and ``batch`` holds only what ``prepare`` built.
      The loss is this micro-batch's share normalised by ``batch.totals`` so that
      summing shares gives the whole-batch loss; metrics are summed the same way,
      and averaged over the step's optimizer steps (μ epochs × mini-batches) in
      metrics.jsonl. ``after_step`` receives the sampling policy's ``kl``, measured
      before any optimizer step of the step.
    * ``after_step(metrics)``, ``state_dict()``, ``load_state_dict()``
      (defaults in ``rlbench.types.AlgorithmBase``).
    * only with ``Needs(offline=True)``: ``offline_rollouts(step, n, tokenizer,
      max_tokens) -> (Rollouts, rewards)``, the step's data in place of sampling
      (``Rollouts.sampler_logprobs`` None: there is no sampler to check against).
    """


@hookspec
def rlbench_rollout_engines() -> Mapping[str, str | type[RolloutEngine]]:
    """Register rollout engines (samplers).

    Return ``{name: "module:Class"}``. The class has a ``Config`` dataclass and is
    constructed as ``Class(config, model, tokenizer, device, seed=seed)``; it
    implements ``generate(prompts, n, sampling) -> Rollouts`` (completions
    group-major, the sampled tokens' logprobs under π_T = softmax(logits / T), T the sampling
    temperature, 1 for greedy decoding: rlbench/modeling/logprobs.py; a prompt with
    ``token_ids`` is fed those ids unchanged, not its text: multi-turn trajectories continue
    from them, and ``Rollouts.prompt_ids`` must equal them) and ``sync(model)``
    (serve the policy's current weights). Optional: ``offload()`` / ``reload()``
    around the training phase, ``close()``, a ``determinism`` attribute (``"bitwise"``: the same
    seed gives the same tokens bit for bit on a CPU; ``"seeded"``: seeded, but kernels or batching
    may change the bits; absent: ``"none"``), which the manifest's determinism tier starts from, and ``supports_batch_invariance(device) -> bool``
    (whether it honours ``Sampling.seed`` per prompt there; absent: it does). The name ``auto`` is reserved: it
    picks ``vllm`` when vLLM imports, else ``hf``. See ``rlbench.types.RolloutEngine``.
    """


@hookspec
def rlbench_executors() -> Mapping[str, str | type[Executor]]:
    """Register suite executors: where a suite's runs execute (``rlbench suite run --executor``).

    Return ``{name: "module:Class"}``. The class has a ``Config`` dataclass (the suite file's
    ``executor:`` section without ``name``) and a ``name``; it is constructed as
    ``Class(config, suite_dir)`` and has ``parallel`` (jobs it keeps submitted at once) and
    implements ``submit(job: rlbench.suites.jobs.Job) -> job_id`` (one run as one job; ``job.command()``
    is what to run, on every machine of a multi-process job; its output appended to ``job.log``),
    ``poll(job_ids) -> {job_id: "queued" | "running" | "done" | "gone"}`` (for ids submitted by an
    earlier controller too: that is how a restarted suite re-attaches) and ``cancel(job_ids)``.
    Optional: ``note(job_id) -> str``, the scheduler's word on an ended job (added to the error of
    a failed run). Retries, resuming and re-attaching are the suite's (rlbench/suites/jobs.py), the same
    on every executor. Built in: ``local`` (the default), ``slurm`` (submitit), ``ray`` (Ray jobs).
    """


@hookspec
def rlbench_tasks() -> Mapping[str, str | type[Task]]:
    """Register reward tasks.

    Return ``{name: "module:Class"}``. The class has a ``Config`` dataclass and is
    constructed as ``Class(config, tokenizer)``; it implements
    ``prompts(split, n, seed) -> list[Prompt]`` and ``score(prompts, texts) ->
    dict[str, list[float]]`` (named reward components; their sum is the reward;
    ``accuracy`` 0/1 is required, held-out evaluation counts it). ``split`` is
    ``train`` or ``test``; ``test`` must not depend on ``seed``. Optional:
    ``manifest_info() -> dict`` (recorded in manifest.json, e.g. the code
    sandbox's isolation level) and a static ``reference(row) -> answer`` that
    turns a JSONL row of ``rlbench reward`` into ``Prompt.answer``. For ``rlbench task check``
    (run before every training run): ``gold(prompt) -> str | None``, the reference written as a
    completion the task should accept (the self-check); ``size(split) -> int`` for a fixed
    dataset; ``all_prompts(split)`` in file order and ``where(prompt) -> "file:line"`` to name
    rejected rows. See ``rlbench.types.Task``, ``rlbench.tasks.common.DatasetTask`` and, for a
    task that is only data plus a verifier, the ``dataset`` task (no plugin needed).
    """


@hookspec
def rlbench_environments() -> Mapping[str, str | type[Environment]]:
    """Register multi-turn environments (the config's ``env.name``; rlbench/environments/).

    Return ``{name: "module:Class"}``. ``Class`` may have a ``Config`` dataclass (its options, set
    in the ``env`` section beside the limits) and is constructed once per trajectory as
    ``Class(options, task)``. An instance is an environment in the shape of TRL's
    ``environment_factory`` (a user's class in that shape needs no plugin: ``env.factory:
    module:Class``, constructed with no arguments):

    ``reset(**row) -> str | None``: the task's row (``Prompt.meta`` plus ``answer`` and
    ``prompt_id``); the first user message, or None to keep the task's prompt. Every public
    method other than reset / step / get_reward / close is a tool: typed parameters and a
    Google-style docstring give its JSON schema. ``get_reward() -> float | dict[str, float]``
    (optional): the trajectory's reward (a float is read as ``accuracy``; a dict as named
    components); without it the task's verifier scores the final assistant message. An
    environment without tools answers each turn through ``step(text) -> (observation | None,
    done)``. An environment that counts attempts may expose ``accuracies`` (an attribute or
    property, so not a tool: each attempt's accuracy), logged as ``env/solved_by_attempt_k`` and
    evaluated as ``solved_by_attempt``. Built in: ``python`` (code in the sandbox as a tool),
    ``retry`` (attempts with feedback on any single-turn task).
    """


@hookspec
def rlbench_hook_options() -> Mapping[str, str | type]:
    """Register the options of an event-hook plugin (the hooks below).

    Return ``{name: "module:Config"}``: a dataclass whose fields are the plugin's options, set
    in the config's ``hooks.<name>`` section and validated like every section (unknown keys
    rejected with a suggestion). Every registered name gets its section, with the dataclass's
    defaults when the config does not mention it; the hook reads it as
    ``config.hooks[name]``. A hook plugin without options registers nothing here.
    """


@hookspec
def rlbench_loggers() -> Mapping[str, str | type[Logger]]:
    """Register metric loggers.

    Return ``{name: "module:Class"}``. The class is constructed as
    ``Class(run_dir, config)`` and implements ``log(step, metrics)`` and ``close()``.
    Which loggers run is chosen by the config's ``logging.loggers`` list.
    """


# --------------------------------------------------------------------------
# Events during a run. Every registered plugin may observe them; return values
# are ignored except where stated.
# --------------------------------------------------------------------------


@hookspec
def rlbench_on_rollouts(step: int, rollouts: Rollouts, rewards: Mapping[str, torch.Tensor], run_dir: str,
                        config: rlbench.config.Config) -> Mapping[str, float] | None:
    """Called after rollouts of ``step`` are generated and scored, before training.

    ``rollouts`` is an ``rlbench.types.Rollouts``; ``rewards`` maps component
    names (``accuracy``, ``format``, …) to float tensors ``[N]``; ``run_dir`` is
    the run directory (a plugin may write its own files there) and ``config``
    the run's ``rlbench.config.Config``. A plugin may return a dict of extra
    metrics (for example the aha-moment rate); they are merged into the step's
    metrics. Must not modify its arguments. An implementation may take any
    subset of the arguments (pluggy passes only what it names).
    """


@hookspec
def rlbench_on_step_end(step: int, metrics: Mapping[str, float]) -> None:
    """Called after each optimizer step with that step's final metrics
    (what is written to metrics.jsonl)."""


@hookspec
def rlbench_on_run_end(run_dir: str, summary: Mapping[str, Any]) -> None:
    """Called once when a run finishes successfully. ``summary`` holds the
    final eval results and cost figures (what cost.json holds)."""
