"""The environments wing: multi-turn, tool-using rollouts (the config's ``env`` section).

chat (tools as JSON schemas, tool calls, the chat template's token deltas) under episodes (the
turn loop that builds masked trajectories through any rollout engine). ``factory`` turns the
config into a callable that makes one environment per trajectory. Imports the config and the
types; the training wing imports this one.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from rlbench import manager
from rlbench.config_env import EnvConfig
from rlbench.config_types import ConfigError


def factory(env: EnvConfig, task: Any) -> Callable[[], object]:
    """What makes one environment per trajectory: a registered environment built as
    ``Class(options, task)``, or the user's ``env.factory`` class built with no arguments."""
    if env.factory:
        module, _, name = env.factory.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config: env.factory {env.factory!r} cannot be imported ({type(e).__name__}: {e})") from None
        return cls
    cls = manager.get("environment", env.name)
    return lambda: cls(env.options, task)
