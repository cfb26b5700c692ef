"""Run setup: what a Trainer is built from. The accelerator and device, the policy (LoRA,
gradient checkpointing), the frozen reference (or its 8/4-bit quantisation, with its own error
measured), the task and algorithm, a critic when the algorithm trains one, AdamW and the
warmup + cosine schedule, DeepSpeed when the launch asks for it, and ``PolicyWeights``: where the
engine and the no-grad passes get the policy's current weights.

Precision: float32 on CPU (bf16 matmuls are far slower there); on GPU with ``model.dtype: auto``
float32 master weights under bf16 autocast (Accelerate mixed precision); an explicit dtype loads
the weights in it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlbench import config as cfgmod
from rlbench import environments as envs
from rlbench import manager, rundir
from rlbench.environments.episodes import Episodes
from rlbench.modeling import models
from rlbench.training import dist
from rlbench.modeling import logprobs as lpmod
from rlbench.modeling import lora
from rlbench.training.checkpoints import seed_all
from rlbench.training.evaluation import eval_splits
from rlbench.modeling.critic import ValueModel
from rlbench.types import Algorithm, Needs, Sampling, Task
from rlbench.training.zero import Zero


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup over ``warmup`` optimizer steps, then cosine decay to ``min_ratio``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class PolicyWeights:
    """The policy's current weights as the rest of the run needs them: ``policy`` (the unwrapped
    module that trains), ``whole`` (whole weights for no-grad passes; under ZeRO-3 a gathered copy),
    ``engine_copy()`` (a plain model to build an engine from; LoRA: adapters merged) and
    ``sync(engine)`` (hand the engine the weights after an update)."""

    def __init__(self, accelerator, model, zero, use_lora: bool):
        self.accelerator, self.model, self.zero, self.use_lora = accelerator, model, zero, use_lora

    @property
    def policy(self):
        return unwrap(self.accelerator, self.model, self.zero is not None)

    @property
    def whole(self):
        return self.zero.full_copy if self.zero and self.zero.full_copy is not None else self.policy

    def refresh(self) -> None:
        """ZeRO-3: gather the shards into the whole copy (a collective); otherwise nothing."""
        if self.zero:
            self.zero.refresh(self.policy)

    def engine_copy(self):
        if self.use_lora:
            return lora.merged_copy(self.policy)
        return self.whole

    def sync(self, engine) -> None:
        if self.use_lora:
            engine.sync(lora.MergedView(self.policy))  # merged on the fly
            return
        self.refresh()
        engine.sync(self.whole)

    def context_length(self) -> int | None:
        return getattr(self.policy.config, "max_position_embeddings", None)

    def state_dict(self) -> dict:
        """Whole weights for a checkpoint (tied tensors once)."""
        return models.unique_tensors(self.whole.state_dict())


def unwrap(accelerator, module, deepspeed: bool):
    """The plain module under accelerate's wrapper. Without DeepSpeed, DDP's ``.module`` by hand:
    accelerate's ``unwrap_model`` imports DeepSpeed whenever it is installed (its CPU warning on
    every run that does not use it)."""
    if deepspeed:
        return accelerator.unwrap_model(module)
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


@dataclass
class Setup:
    accelerator: object
    device: torch.device
    rank: int
    world: int
    tokenizer: object
    task: Task
    algorithm: Algorithm
    needs: Needs
    model: torch.nn.Module  # the policy as accelerate / DeepSpeed prepared it (the training forward)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    critic: torch.nn.Module | None  # prepared
    reference: torch.nn.Module
    teacher: torch.nn.Module | None  # Needs.teacher's frozen model (opd), else None
    n_teacher: int
    zero: object | None  # rlbench.training.zero.Zero under DeepSpeed
    weights: PolicyWeights
    n_params: int
    n_critic: int
    model_hash: str
    load_seconds: float
    max_drift: float  # rollout.max_logprob_drift, or its default for the device
    seed: int  # run.seed: everything was seeded with it; the update's shuffles are derived from it
    episodes: Episodes | None = None  # the config's env section: multi-turn rollouts (rlbench/environments)
    eval_splits: list[str] = field(default_factory=list)  # eval.splits resolved: held-out splits besides test


def build(cfg: cfgmod.Config) -> Setup:
    from accelerate import Accelerator

    use_cuda = torch.cuda.is_available()
    dtype = models.resolve_dtype(cfg.model.dtype, torch.device("cuda" if use_cuda else "cpu"))
    # cpu=True would quietly turn a DeepSpeed launch into plain data parallel (accelerate 1.x)
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(cpu=not use_cuda and not use_deepspeed,
                              mixed_precision="bf16" if use_cuda and dtype == torch.bfloat16 else "no")
    weights_dtype = torch.float32 if cfg.model.dtype == "auto" else dtype  # auto on GPU: fp32 master + bf16 autocast
    device = accelerator.device
    seed_all(cfg.run.seed)  # before anything is initialised (tiny-random weights, the critic's head)
    # Rank and world from torch.distributed: under DeepSpeed on CPU accelerate reports index 0 on every rank.
    rank, world = dist.rank(), dist.world_size()
    if cfg.rollout.prompts_per_step % world:
        raise cfgmod.ConfigError(f"config: rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple "
                                 f"of the number of processes ({world}): groups are never split across ranks")

    t0 = time.perf_counter()
    policy, tok = models.load(cfg.model.name, seed=cfg.run.seed, dtype=weights_dtype, tiny_layers=cfg.model.tiny_layers,
                              tiny_hidden=cfg.model.tiny_hidden, tiny_init_std=cfg.model.tiny_init_std)
    n_params = sum(p.numel() for p in policy.parameters())
    model_hash = rundir.tensor_hash(sorted(policy.state_dict().items())[:4])
    # The frozen reference: a separate copy (or its 8/4-bit quantisation), never handed to the optimizer.
    if cfg.model.reference_quantization != "none":
        reference = models.quantized_copy(policy, cfg.model.reference_quantization, device)
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    use_lora = cfg.model.lora_rank > 0
    if use_lora:
        policy = lora.apply(policy, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout,
                               cfg.model.lora_targets)
    if cfg.train.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
    load_seconds = time.perf_counter() - t0

    task = manager.get("task", cfg.names["task"])(cfg.task, tok)
    extra_splits = eval_splits(task, cfg.eval.splits)  # an unknown split name stops the run here, before training
    episodes = Episodes(envs.factory(cfg.env, task), cfg.env, tok, models.stop_token_ids(tok)) if cfg.env else None
    algo_cls = manager.get("algorithm", cfg.names["algorithm"])
    algorithm, needs = algo_cls(cfg.algorithm), algo_cls.needs(cfg.algorithm)
    teacher, n_teacher = load_teacher(needs.teacher, tok, weights_dtype, device) if needs.teacher else (None, 0)
    if cfg.rollout.group_size < needs.group_size:
        raise cfgmod.ConfigError(f"config: rollout.group_size={cfg.rollout.group_size} but algorithm "
                                 f"{cfg.names['algorithm']!r} needs at least {needs.group_size}")
    if use_lora and needs.critic:
        raise cfgmod.ConfigError("config: model.lora_rank with an algorithm that trains a critic (ppo) is not supported")
    zero = None
    if use_deepspeed:
        zero = Zero(accelerator, cfg.train, policy, device, critic=needs.critic, lora=use_lora)

    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.train.lr}]
    critic = None
    if needs.critic:  # initialised from the policy (or critic_model); trained by the same optimizer, its own lr
        critic = _critic(cfg, needs, policy, tok, weights_dtype)
        groups.append({"params": list(critic.parameters()), "lr": needs.critic_lr or cfg.train.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))
    total = cfg.train.steps * needs.epochs * needs.mini_batches  # optimizer steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.warmup_steps, total, cfg.train.min_lr_ratio))
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process per call.
    model, optimizer = accelerator.prepare(policy, opt)
    if zero:
        zero.engine = model
    n_critic = sum(p.numel() for p in critic.parameters()) if critic is not None else 0
    critic = accelerator.prepare(critic) if critic is not None else None
    return Setup(accelerator=accelerator, device=device, rank=rank, world=world, tokenizer=tok, task=task,
                 algorithm=algorithm, needs=needs, model=model, optimizer=optimizer, scheduler=scheduler, critic=critic,
                 reference=reference, teacher=teacher, n_teacher=n_teacher, zero=zero,
                 weights=PolicyWeights(accelerator, model, zero, use_lora),
                 n_params=n_params, n_critic=n_critic, model_hash=model_hash, load_seconds=load_seconds,
                 max_drift=cfg.rollout.max_logprob_drift or (2.0 if use_cuda else 1e-3), seed=cfg.run.seed,
                 episodes=episodes, eval_splits=extra_splits)


def _critic(cfg, needs: Needs, policy, tok, dtype):
    if not needs.critic_model:
        return ValueModel(policy)
    body, ctok = models.load(needs.critic_model, seed=cfg.run.seed + 1, dtype=dtype)
    if ctok.get_vocab() != tok.get_vocab():
        raise cfgmod.ConfigError(f"config: algorithm critic_model {needs.critic_model!r} has a different tokenizer "
                                 f"from the policy {cfg.model.name!r}; the critic reads the policy's tokens")
    return ValueModel(body, copy_body=False)


@torch.no_grad()
def load_teacher(name: str, tok, dtype: torch.dtype, device) -> tuple[torch.nn.Module, int]:
    """A frozen teacher (``Needs.teacher``) and its parameter count; its tokenizer must be the
    policy's (the teacher scores the student's token ids as they are)."""
    try:
        models.check_name(name)
    except models.ModelError as e:
        raise cfgmod.ConfigError(f"config: the teacher model: {e}") from None
    teacher, ttok = models.load(name, dtype=dtype)
    if ttok.get_vocab() != tok.get_vocab():
        raise cfgmod.ConfigError(f"config: the teacher {name!r} has another tokenizer than the policy's: it cannot "
                                 "score the policy's tokens")
    return teacher.eval().requires_grad_(False).to(device), sum(p.numel() for p in teacher.parameters())


def reference_quantization_error(cfg, s: Setup, engine, run_dir: Path, resume: bool) -> dict | None:
    """|Δ token logprob| between the quantised reference and full precision (the untrained policy)
    on greedy completions of up to 32 held-out problems; on resume, the start's figure (manifest)."""
    if cfg.model.reference_quantization == "none":
        return None
    man = Path(run_dir) / "manifest.json"
    if resume and man.is_file():
        return json.loads(man.read_text()).get("reference_quantization")
    prompts = s.task.prompts("test", min(32, cfg.eval.n), seed=0)
    ro = engine.generate(prompts, 1, Sampling(max_tokens=cfg.eval.max_tokens, greedy=True, logprobs=False))
    inputs = {k: v.to(s.device) for k, v in ro.model_inputs().items()}
    C, mask = ro.completion_ids.shape[1], ro.completion_mask.to(s.device)
    s.model.eval()
    micro = cfg.train.micro_batch_size
    full = lpmod.batched_logprobs(s.weights.whole, inputs, C, micro)  # [n, C]
    quant = lpmod.batched_logprobs(s.reference, inputs, C, micro)  # [n, C]
    gap = (full - quant).abs() * mask
    tokens = mask.sum().clamp(min=1)
    return {"mode": cfg.model.reference_quantization, "mean_abs_logprob_error": (gap.sum() / tokens).item(),
            "max_abs_logprob_error": gap.max().item(), "tokens": int(tokens.item()), "completions": len(prompts)}
