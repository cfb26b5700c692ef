"""Collectives for multi-process runs (``accelerate launch``), no-ops in a single process.

The trainer keeps data parallelism explicit and small:
  * each rank takes a contiguous shard of the step's prompts (whole groups, never split);
  * loss normalisers (``seqs``, ``tokens``, ``pairs``) are summed over ranks before the loss, so
    every rank's loss is its share of the global batch loss;
  * gradients are summed over ranks after accumulation (``sum_gradients``), not averaged by DDP
    on every backward: ranks may hold different numbers of micro-batches (dynamic sampling,
    skipped prompts) without a mismatch of collectives;
  * skip decisions (non-finite values, a stop signal) are agreed on by all ranks (``any_true``).
Works over gloo (CPU) and NCCL (GPU). Tensors sent over NCCL must live on the GPU, so every
helper moves its payload to ``device``.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as td


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def world_size() -> int:
    return td.get_world_size() if active() else 1


def rank() -> int:
    return td.get_rank() if active() else 0


def launch_rank() -> int:
    """This process's rank as ``accelerate launch`` / torchrun set it, before the process group
    exists (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


def _device() -> torch.device:
    if active() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    td.all_reduce(t)
    return t.cpu().tolist()


def max_floats(values: list[float]) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return t.cpu().tolist()


def any_true(flag: bool) -> bool:
    return bool(max_floats([float(flag)])[0]) if active() else flag


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; small payloads only)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def sum_gradients(params) -> None:
    """Sum ``.grad`` over ranks; a missing gradient counts as zeros (every rank must send the
    same tensors in the same order)."""
    if not active():
        return
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        td.all_reduce(p.grad)


def barrier() -> None:
    if active():
        td.barrier()
