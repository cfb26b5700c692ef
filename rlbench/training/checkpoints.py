"""Resumable checkpoints: ``checkpoints/step_N/`` of a run directory.

A checkpoint holds model.safetensors (whole weights), critic.safetensors (PPO), trainer.pt
(optimizer, scheduler, RNG states, algorithm state, cost counters and phase times, the step and
the skipped-step streak) and state.json, written last with every file's size. It is written into
``.tmp_step_N``, every file and the directory fsynced, then renamed: a crash at any moment leaves
either the complete checkpoint or none. Old ones are renamed to ``.old_*`` before deletion, so a
half-deleted checkpoint is never mistaken for a complete one. The data position is the step
number (prompts are drawn by seed and step), so resuming needs no sampler state.

Rank 0 writes (every rank holds the same weights, optimizer state and RNG streams, so a checkpoint
does not depend on the world size and resumes at any other). Under DeepSpeed the optimizer state
is partitioned: every rank also writes its part under ``deepspeed/``, and such a checkpoint resumes
only with the same ZeRO stage and number of processes (both are recorded and checked).
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlbench import rundir
from rlbench.training import dist
from rlbench.training.faults import TrainingError


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.random.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@dataclass
class Loaded:
    """A checkpoint read into memory (nothing applied yet)."""

    path: Path
    model: dict  # state dict, whole weights
    critic: dict | None
    state: dict  # trainer.pt
    meta: dict  # state.json


class Checkpoints:
    def __init__(self, run_dir: Path, keep: int, rank: int):
        self.run_dir, self.dir, self.keep, self.is_main = Path(run_dir), Path(run_dir) / "checkpoints", keep, rank == 0

    def complete(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("step_*") if (p / "state.json").is_file())

    def latest(self) -> Path | None:
        ckpts = self.complete()
        return ckpts[-1] if ckpts else None

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".old_{path.name}_{time.time_ns()}")
        path.rename(trash)
        rundir.fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, *, model_state, critic_state, state, zero=None, refresh=lambda: None) -> Path:
        """Write step ``step``'s checkpoint. ``model_state``, ``critic_state`` and ``state`` (what
        trainer.pt holds besides the RNG states and the step) are callables, asked on rank 0 only;
        ``refresh`` runs on every rank first (ZeRO-3: gather the shards, a collective); ``zero``
        (DeepSpeed) writes every rank's optimizer partition."""
        final, tmp = self.dir / f"step_{step:06d}", self.dir / f".tmp_step_{step:06d}"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        if zero:
            refresh()
            zero.save(tmp / "deepspeed")
        if self.is_main:
            self._write(step, tmp, model_state(), critic_state(), state(), zero)
        dist.barrier()
        return final

    def _write(self, step: int, tmp: Path, model_sd: dict, critic_sd: dict | None, state: dict, zero) -> None:
        final = self.dir / f"step_{step:06d}"
        save_file(model_sd, str(tmp / "model.safetensors"))
        if critic_sd is not None:
            save_file({k: v.detach().contiguous().cpu().clone() for k, v in critic_sd.items()},
                      str(tmp / "critic.safetensors"))
        torch.save({**state, "rng": rng_state(), "step": step}, tmp / "trainer.pt")
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        meta = {"step": step, "data_position": step, "files": files}
        if zero:
            meta["deepspeed"] = zero.signature()
        rundir.write_json(tmp / "state.json", meta)
        rundir.fsync_tree(tmp)
        if final.exists():  # a newer run of this step (resumed from an older checkpoint) replaces it
            self._discard(final)
        tmp.rename(final)
        rundir.fsync_dir(self.dir)
        ckpts = self.complete()
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            self._discard(old)

    # -- reading -------------------------------------------------------------------------------
    def _read(self, ck: Path, with_critic: bool) -> Loaded:
        """Load a checkpoint's files; raises if one is missing, truncated or unreadable."""
        meta = json.loads((ck / "state.json").read_text())
        for name, size in (meta.get("files") or {}).items():
            actual = (ck / name).stat().st_size if (ck / name).is_file() else None
            if actual != size:
                raise TrainingError(f"{ck / name}: {actual} bytes, the checkpoint recorded {size}")
        return Loaded(ck, load_file(str(ck / "model.safetensors")),
                      load_file(str(ck / "critic.safetensors")) if with_critic else None,
                      torch.load(ck / "trainer.pt", weights_only=False), meta)

    def newest_loadable(self, with_critic: bool, zero_signature: dict | None) -> Loaded | None:
        """The newest checkpoint that loads (an unreadable one is reported and the next older one
        tried); None when there is none yet. Leftovers of an interrupted write or deletion are
        removed first. A checkpoint written under another DeepSpeed stage or world size is refused."""
        if self.is_main:
            for leftover in list(self.dir.glob(".tmp_step_*")) + list(self.dir.glob(".old_step_*")):
                shutil.rmtree(leftover, ignore_errors=True)
        ckpts = self.complete()
        if not ckpts:  # killed before its first checkpoint: start again from step 0
            print(f"rlbench: no complete checkpoint under {self.dir}; starting from step 0", file=sys.stderr)
            return None
        errors = []
        for ck in reversed(ckpts):
            try:
                loaded = self._read(ck, with_critic)
                break
            except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous checkpoint
                errors.append(f"{ck.name}: {type(e).__name__}: {e}")
                print(f"rlbench: checkpoint {ck} does not load ({type(e).__name__}: {e}); trying an older one",
                      file=sys.stderr)
        else:
            raise TrainingError(f"no checkpoint under {self.dir} loads: " + "; ".join(errors))
        written = loaded.meta.get("deepspeed")
        if written != zero_signature:
            def what(d):
                return f"with DeepSpeed ZeRO-{d['zero_stage']} on {d['world_size']} processes" if d else "without DeepSpeed"
            raise TrainingError(f"checkpoint {ck} was written {what(written)} and this run is {what(zero_signature)}: "
                                "resume it with the accelerate config and number of processes it was written with (DeepSpeed "
                                "keeps the optimizer state partitioned per rank)")
        return loaded

    def drop_records_after(self, step: int) -> None:
        """Records written after the checkpoint resumed from belong to the lost future: drop them."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "eval.jsonl", "faults.jsonl"):
            rundir.truncate_jsonl(self.run_dir / name, lambda r: r.get("step", 0) <= step)


@dataclass
class Restorable:
    """What a checkpoint is restored into: the run's trained parts."""

    policy: torch.nn.Module  # unwrapped (or DeepSpeed's, with ``zero``)
    optimizer: torch.optim.Optimizer
    scheduler: object
    critic: torch.nn.Module | None  # unwrapped
    algorithm: object  # its state_dict / load_state_dict
    zero: object | None


def restore(loaded: Loaded, into: Restorable) -> None:
    """Apply a loaded checkpoint: weights (DeepSpeed: its own files, each rank its partition),
    optimizer, scheduler, critic, algorithm state and the RNG streams."""
    ck, state = loaded.path, loaded.state
    policy, optimizer, scheduler, critic, algorithm, zero = (into.policy, into.optimizer, into.scheduler, into.critic,
                                                             into.algorithm, into.zero)
    if zero:
        if not zero.load(ck / "deepspeed"):
            raise TrainingError(f"checkpoint {ck}: DeepSpeed could not load {ck / 'deepspeed'}")
    else:
        missing, unexpected = policy.load_state_dict(loaded.model, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise TrainingError(f"checkpoint {ck} does not match the model: missing={missing} unexpected={unexpected}")
        optimizer.load_state_dict(state["optimizer"])
    if critic is not None:
        critic.load_state_dict(loaded.critic)
    scheduler.load_state_dict(state["scheduler"])
    algorithm.load_state_dict(state["algorithm"])
    set_rng_state(state["rng"])
