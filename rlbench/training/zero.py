"""DeepSpeed ZeRO-2 / ZeRO-3 for the trainer (an accelerate config with ``distributed_type: DEEPSPEED``,
configs/accelerate/zero2.yaml and zero3.yaml).

The trainer drives DeepSpeed's engine itself instead of through ``accelerator.backward``:
  * the DeepSpeed config gets the micro-batch size and gradient clipping from the rlbench config
    and one accumulation step: the trainer sets the accumulation boundary on the last backward of
    an optimizer step, and its loss shares are already normalised by global-batch totals;
  * DeepSpeed averages gradients over ranks, so each rank's loss share is multiplied by the world
    size (the sum over ranks is the global loss);
  * DeepSpeed's reductions are collectives: every rank makes the same number of backwards (the
    trainer pads with zero-loss micro-batches), and a NaN/inf loss on any rank turns every rank's
    loss into NaN, so DeepSpeed's own overflow check discards the step on all of them;
  * ZeRO-3: the rollout engine and the no-grad policy passes (old logprobs, evaluation KL, the
    quantised reference's error) use ``full_copy``, whole weights gathered from the shards after
    every update; a colocated engine holds whole weights anyway;
  * checkpoints: every rank writes its optimizer partition with ``engine.save_checkpoint``.

Not covered: a critic (PPO) or LoRA with ZeRO-3 (refused at start); resuming at another world
size or stage (DeepSpeed's universal checkpoints are not wired in); parameter or optimizer offload
(the shipped configs say ``none``; untested otherwise).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch

from rlbench import config as cfgmod
from rlbench.training import dist

TAG = "state"  # DeepSpeed's checkpoint tag inside a checkpoint's deepspeed/ directory


class Zero:
    def __init__(self, accelerator, train: cfgmod.TrainConfig, policy, device, *, critic: bool, lora: bool):
        plugin = accelerator.state.deepspeed_plugin
        self.stage = plugin.zero_stage
        self.world = dist.world_size()
        if critic:
            raise cfgmod.ConfigError("config: DeepSpeed with an algorithm that trains a critic (ppo) is not supported; "
                                     "use the multi-process accelerate config (configs/accelerate/multi-gpu.yaml)")
        if lora and self.stage == 3:
            raise cfgmod.ConfigError("config: model.lora_rank with DeepSpeed ZeRO-3 is not supported (use ZeRO-2: "
                                     "the frozen base weights are not worth partitioning)")
        plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": train.micro_batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": train.micro_batch_size * self.world, "gradient_clipping": train.max_grad_norm})
        self.full_copy = copy.deepcopy(policy).eval().requires_grad_(False).to(device) if self.stage == 3 else None
        self.engine = None  # the DeepSpeedEngine, once accelerate has prepared it

    def signature(self) -> dict:
        """What a checkpoint records: it resumes only under the same stage and world size."""
        return {"zero_stage": self.stage, "world_size": self.world}

    # -- one optimizer step -------------------------------------------------------------
    def backward_fn(self, n_micro: int):
        """``backward`` for one optimizer step's ``n_micro`` micro-batch losses (see the module docstring)."""
        calls = 0

        def backward(loss: torch.Tensor) -> None:
            nonlocal calls
            calls += 1
            if dist.any_true(not bool(torch.isfinite(loss))):
                loss = loss * float("nan")
            self.engine.set_gradient_accumulation_boundary(calls == n_micro)
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
        return backward

    def step(self) -> tuple[float, bool]:
        """``engine.step()``: clip and update, or (NaN/inf gradients) discard them. Returns the
        gradient norm before clipping and whether every rank applied the update."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # may be unset on some ranks: the maximum is everyone's
        grad_norm = dist.max_floats([-1.0 if norm is None else float(norm)])[0]
        return grad_norm, not dist.any_true(not self.engine.was_step_applied())

    # -- whole weights (ZeRO-3) -----------------------------------------------------------
    @contextmanager
    def gathered(self, module):
        """ZeRO-3: every parameter of ``module`` whole on every rank inside the block (a collective)."""
        if self.stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield

    @torch.no_grad()
    def refresh(self, module) -> None:
        """Copy the current (gathered) weights of ``module`` into ``full_copy`` (ZeRO-3; a collective)."""
        if self.full_copy is None:
            return
        with self.gathered(module):
            for (name, p), (name2, q) in zip(module.named_parameters(), self.full_copy.named_parameters()):
                assert name == name2, (name, name2)
                q.copy_(p)

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Every rank: the engine's weights and this rank's optimizer partition."""
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load(self, directory: Path) -> bool:
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        return path is not None
