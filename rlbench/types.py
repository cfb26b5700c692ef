"""The data that flows through one training step, and the plugin protocols.

    Task.prompts ──► [Prompt] ──► RolloutEngine.generate(n=G) ──► Rollouts
    Task.score(prompts, texts) ──► {component: [N]} rewards
    Algorithm.prepare(rollouts, rewards, ctx) ──► TrainBatch
    trainer micro-batches: Algorithm.loss(logprobs, micro_batch, ctx) ──► (loss, metrics)

Shapes: N = number of completions (B prompts × G samples, group-major: rows
g*G … g*G+G-1 share prompt g), P = padded prompt length, C = padded completion
length, L = P + C.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from rlbench import rollout_layout as layout


class DataError(ValueError):
    """Malformed input data (a dataset row, a pairs file): names the file and line."""


@dataclass
class Prompt:
    """One task problem, ready for a model."""

    id: str  # stable identifier (used for disjoint splits and paired comparisons)
    text: str  # the chat-templated prompt string fed to the model
    answer: Any  # the reference answer the verifier needs
    meta: dict = field(default_factory=dict)  # task data; ``messages``: the chat the text renders, when known
    # the prompt as token ids: a multi-turn continuation (rlbench.training.episodes). Engines feed these
    # ids unchanged instead of tokenizing ``text`` (never re-tokenize sampled tokens)
    token_ids: list[int] | None = None


@dataclass
class Rollouts:
    """Completions sampled for a list of prompts, the same from every engine."""

    prompts: list[Prompt]  # B prompts
    prompt_ids: list[list[int]]  # B token-id lists (unpadded)
    group: torch.Tensor  # [N] long, index into prompts
    completion_ids: torch.Tensor  # [N, C] long, right-padded with pad_id
    completion_mask: torch.Tensor  # [N, C] float, 1 for real completion tokens
    sampler_logprobs: torch.Tensor | None  # [N, C] float, the sampled tokens' log π_T (rlbench/modeling/logprobs.py; 0 at padding); None for offline data
    texts: list[str]  # N decoded completions (special tokens stripped)
    finish_reasons: list[str]  # N of "stop" (EOS / end-of-turn) or "length"
    pad_id: int = 0
    # multi-turn trajectories (rlbench.training.episodes): [N, C] float, 1 on the environment's tokens
    # inside the completion region (tool results, feedback, the role headers the template adds). They
    # are attended to but never trained on: ``completion_mask`` (the loss mask) is 1 on sampled tokens only.
    env_mask: torch.Tensor | None = None
    turns: list[dict] | None = None  # N per-trajectory records (turns, tool calls, errors, env reward)
    # [N, C] float: an environment's per-turn rewards at each turn's last sampled token (PPO's GAE and
    # REINFORCE++'s returns take them as rewards at those tokens); None: one reward per trajectory
    turn_rewards: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def group_size(self) -> int:
        return self.n // max(1, len(self.prompts))

    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # [N] sampled tokens

    def attention(self) -> torch.Tensor:
        """[N, C] float: the completion region's real tokens, sampled and environment ones."""
        return self.completion_mask if self.env_mask is None else self.completion_mask + self.env_mask

    def select_groups(self, keep: list[int]) -> "Rollouts":
        """The rollouts of prompts ``keep`` (indices into ``prompts``), in that order, re-indexed."""
        return layout.select_groups(self, keep)

    @classmethod
    def from_token_lists(cls, prompts: list[Prompt], prompt_ids: list[list[int]], group: list[int],
                         completions: list[list[int]], texts: list[str], finish_reasons: list[str],
                         pad_id: int) -> "Rollouts":
        """Rollouts of completions that were not sampled (offline data: preference pairs, reference
        solutions): token lists right-padded to the longest, no sampler logprobs."""
        return layout.from_token_lists(cls, prompts, prompt_ids, group, completions, texts, finish_reasons, pad_id)

    @staticmethod
    def cat(parts: list["Rollouts"]) -> "Rollouts":
        """Concatenate rollouts of different prompts (completions re-padded to the longest)."""
        return layout.cat(parts)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Left-padded prompt + right-padded completion, ready for a forward pass."""
        return layout.model_inputs(self)


@dataclass
class TrainBatch:
    """What an algorithm's ``prepare`` returns and its ``loss`` consumes.

    ``tensors`` all have the leading dimension N (so the trainer can split them
    into micro-batches); ``input_ids`` / ``attention_mask`` [N, L] and
    ``completion_mask`` [N, C] are always present, and ``row`` [N] (long) is the
    index of each row into the rollouts it came from: the trainer uses it to hand
    ``loss`` the context tensors (reference/old logprobs …) of exactly these rows,
    so an algorithm that selects or reorders rows keeps ``row`` with them.
    ``totals`` holds normalisers over the whole optimizer batch (``seqs``, ``tokens``),
    so a loss computed per micro-batch and summed equals the loss of the whole batch.
    The batch holds what ``prepare`` built; what the trainer computes reaches the
    algorithm through ``StepContext`` only.
    """

    tensors: dict[str, torch.Tensor]
    totals: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_rollouts(cls, rollouts: Rollouts, **tensors: torch.Tensor) -> "TrainBatch":
        """The model inputs of ``rollouts`` plus any per-row tensors (advantages, …)."""
        mask = rollouts.completion_mask.float()  # [N, C]
        base = {**rollouts.model_inputs(), "completion_mask": mask, "row": torch.arange(rollouts.n)}
        totals = {"seqs": float(rollouts.n), "tokens": float(mask.sum().clamp(min=1).item())}
        return cls({**base, **tensors}, totals)

    def with_rows(self) -> "TrainBatch":
        """This batch with its ``row`` index [N]; a batch built by hand without it stands for
        rollouts rows 0..N−1 (the one place that fallback is decided)."""
        if "row" in self.tensors:
            return self
        return TrainBatch({**self.tensors, "row": torch.arange(self.size)}, self.totals, self.metrics)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    @property
    def size(self) -> int:
        return self.tensors["input_ids"].shape[0]

    def split(self, micro_batch_size: int) -> Iterator["TrainBatch"]:
        for start in range(0, self.size, micro_batch_size):
            sl = slice(start, start + micro_batch_size)
            yield TrainBatch({k: v[sl] for k, v in self.tensors.items()}, self.totals, {})

    def select(self, rows: torch.Tensor) -> "TrainBatch":
        """Rows ``rows`` as a batch of their own (a PPO mini-batch): ``seqs``/``tokens``/``pairs``
        totals recomputed for these rows, other totals kept."""
        tensors = {k: v[rows] for k, v in self.tensors.items()}
        totals = dict(self.totals)
        totals["seqs"] = float(len(rows))
        totals["tokens"] = float(tensors["completion_mask"].sum().clamp(min=1).item())
        if "pairs" in totals:
            totals["pairs"] = float(max(1, len(rows) // 2))
        return TrainBatch(tensors, totals, dict(self.metrics))

    def sorted_by_length(self, prompt_only: bool = False) -> "TrainBatch":
        """Rows reordered longest first, so micro-batches hold similar lengths (less padding).
        ``prompt_only``: by prompt length, stable, so a group's rows stay together."""
        am = self.tensors["attention_mask"]
        lengths = am[:, :am.shape[1] - self.tensors["completion_mask"].shape[1]].sum(-1) if prompt_only else am.sum(-1)
        order = torch.argsort(lengths, descending=True, stable=True)
        return dataclasses.replace(self, tensors={k: v[order] for k, v in self.tensors.items()})

    def trimmed(self) -> "TrainBatch":
        """Drop columns that are padding in every row: leading prompt padding and trailing
        completion padding. Loss values are unchanged (padding is masked anyway)."""
        am, cm = self.tensors["attention_mask"], self.tensors["completion_mask"]
        L, C = am.shape[1], cm.shape[1]
        P = L - C
        real_cols = am[:, :P].any(0).nonzero()
        left = int(real_cols[0]) if len(real_cols) else P
        c_new = max(1, int(am[:, P:].sum(-1).max().item()))  # real completion-region tokens (environment ones too)
        out = {}
        for k, v in self.tensors.items():
            if k in ("input_ids", "attention_mask"):
                out[k] = v[:, left:P + c_new]
            elif v.dim() >= 2 and v.shape[1] == C:
                out[k] = v[:, :c_new]
            else:
                out[k] = v
        return dataclasses.replace(self, tensors=out)

    def to(self, device: torch.device | str) -> "TrainBatch":
        return dataclasses.replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})


@dataclass
class Needs:
    """What an algorithm asks the trainer for; the trainer loads only these."""

    reference: bool = False  # frozen reference logprobs ("ref_logprobs" in the batch)
    old_logprobs: bool = False  # a no-grad pass of the policy before updating ("old_logprobs")
    group_size: int = 1  # completions per prompt the rollout engine must produce
    epochs: int = 1  # passes (μ) over each rollout batch; each pass is one optimizer step
    pairs: bool = False  # rows come in (chosen, rejected) pairs: keep order, never split a pair
    critic: bool = False  # a value model (rlbench.modeling.critic.ValueModel) trained beside the policy
    critic_lr: float = 0.0  # its learning rate (0 = train.lr)
    critic_model: str = ""  # the critic's body: "" = a copy of the policy's, else this model (same tokenizer)
    mini_batches: int = 1  # optimizer steps per epoch: the batch is shuffled and split (pairs kept whole)
    dynamic_sampling: int = 0  # > 0: drop prompt groups whose rewards are all equal and sample up to this
    #                            many extra rounds of prompts to refill the batch (DAPO)
    offline: bool = False  # the algorithm supplies its own rollouts (offline data) via
    #                        ``offline_rollouts(step, n, tokenizer, max_tokens) -> (Rollouts, rewards)``
    teacher: str = ""  # a frozen teacher model (any name the model section accepts, same tokenizer):
    #                    its logprobs of the sampled tokens reach the loss as ``teacher_logprobs`` (opd)
    gold_rollouts: bool = False  # nothing is sampled: each training prompt's one rollout is the task's
    #                              reference written as a completion (``task.gold``; sft)


@dataclass
class StepContext:
    """What the trainer gives an algorithm, in ``prepare`` and in ``loss``: the one channel for it.

    Per-row tensors are aligned with the rows at hand: in ``prepare(rollouts, …)`` with the
    rollouts' N rows [N, C]; in ``loss(logprobs, micro_batch, ctx)`` with the micro-batch's rows
    [n, c] (the trainer selects them by the batch's ``row`` index and trims them to the
    micro-batch's columns). ``ref_logprobs`` / ``old_logprobs`` are there when the algorithm's
    ``Needs`` ask for them (``ref_logprobs`` also whenever ``eval.kl`` is on); ``values`` are the
    critic's predictions: before the update in ``prepare`` (no gradient), the current ones with
    their gradient in ``loss`` (a value loss trains the critic through them); ``is_weights`` (loss
    only) are the off-policy weights of ``rollout.is_correction`` (``ops.behavior_weights``:
    truncated, masked or decoupled importance weights against the behaviour policy);
    ``sampler_logprobs`` are the engine's logprobs of the sampled tokens, from the weights that
    generated them (with ``rollout.off_policy_steps`` k > 0, k updates older than the trainer's);
    ``teacher_logprobs`` are a frozen teacher's log π_T of the same tokens (``Needs.teacher``);
    ``max_tokens`` is the completion budget (a constant length normaliser, as Dr. GRPO uses)."""

    step: int
    epoch: int = 0
    ref_logprobs: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    max_tokens: int = 0

    _ROW_TENSORS = ("ref_logprobs", "old_logprobs", "values", "is_weights", "sampler_logprobs", "teacher_logprobs")

    def select(self, rows: torch.Tensor, columns: int) -> "StepContext":
        """This context for the rollouts rows ``rows`` and their first ``columns`` completion
        positions (a micro-batch's view)."""
        def pick(t):
            return None if t is None else t[rows.to(t.device)][:, :columns]
        return dataclasses.replace(self, **{k: pick(getattr(self, k)) for k in self._ROW_TENSORS})

    def to(self, device: torch.device | str) -> "StepContext":
        def move(t):
            return None if t is None else t.to(device)
        return dataclasses.replace(self, **{k: move(getattr(self, k)) for k in self._ROW_TENSORS})


class AlgorithmBase:
    """Defaults for the optional parts of an algorithm: no per-step update after the
    optimizer step, no state to checkpoint. Subclass it and write prepare/loss/needs."""

    def after_step(self, metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- what a registered plugin provides (hookspecs.py says how each is registered and built) -----------

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


@dataclass
class Sampling:
    """Sampler settings shared by every engine (so algorithms cannot tell engines apart)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    greedy: bool = False
    logprobs: bool = True  # report sampled-token logprobs (evaluation turns it off)
    # Set: each prompt's samples are drawn from a generator seeded by (seed, prompt id), so they
    # do not depend on the batch, the shard or the world size (rollout.batch_invariant_sampling).
    seed: int | None = None
