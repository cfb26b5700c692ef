"""rlbench: benchmark RL post-training algorithms for language models.

Importing this package is cheap: it never imports vLLM, DeepSpeed or
bitsandbytes (plugins are resolved lazily by name).
"""
import pluggy

from rlbench.hookspecs import API_VERSION

__version__ = "0.1.0"
hookimpl = pluggy.HookimplMarker("rlbench")

__all__ = ["API_VERSION", "__version__", "hookimpl"]
