"""The config's ``env`` section: a multi-turn environment beside the task (rlbench.environments).

Without an ``env`` section a run is single-turn, exactly as before. With one, the task still
supplies the rows (each passed to the environment's ``reset(**row)``) and, unless the environment
rewards, the verifier of the final answer; the environment supplies the interaction. The section
holds the limits below plus the named environment's own options (its ``Config`` dataclass), all
checked like every section: an unknown key is an error naming the closest valid one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rlbench import manager
from rlbench.config_types import ConfigError, _suggest, build_section

FILTERS = ("void_turns", "max_turns", "truncated")


@dataclass(frozen=True)
class EnvConfig:
    name: str = ""  # a registered environment: python | retry | textarena | a plugin's
    factory: str = ""  # or "module:Class": a class in TRL's environment_factory shape, built with no arguments
    max_turns: int = 4  # assistant turns per trajectory
    max_tool_calls: int = 3  # per trajectory; calls past it are answered with an error and end the trajectory
    max_observation_tokens: int = 256  # an environment message is cut to this many tokens
    max_context_tokens: int = 2048  # prompt + every turn; each turn also samples at most rollout.max_tokens
    tool_timeout_s: float = 5.0  # per tool call and per reset / step / get_reward
    # trajectories that get no gradient (counted in env/filtered_frac), a benchmark factor:
    # void_turns (a turn with neither a tool call nor a final answer, SimpleTIR), max_turns (ended by
    # the turn limit), truncated (the last turn hit the token limit)
    filter: list = field(default_factory=list)
    # a trajectory whose tokens differ from the chat template's rendering of its conversation
    # (env/template_drift): count (train on the exact sampled tokens, the default) | error
    on_drift: str = "count"
    options: Any = None  # the named environment's own options (its Config dataclass)

    def validate(self):
        if bool(self.name) == bool(self.factory):
            raise ValueError("env needs exactly one of name (a registered environment) or factory (module:Class)")
        if self.factory and ":" not in self.factory:
            raise ValueError(f"env.factory must be module:Class, got {self.factory!r}")
        for k in ("max_turns", "max_tool_calls", "max_observation_tokens", "max_context_tokens", "tool_timeout_s"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        bad = [f for f in self.filter if f not in FILTERS]
        if bad:
            raise ValueError(f"env.filter: unknown {bad}; choose from {', '.join(FILTERS)}")
        if self.on_drift not in ("count", "error"):
            raise ValueError(f"env.on_drift must be count or error, got {self.on_drift!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        if self.options is not None:
            out.update(dataclasses.asdict(self.options))
        return out


def build_env(values: dict | None) -> EnvConfig | None:
    """The ``env`` section, or None when the config has none (a single-turn run)."""
    if values is None:
        return None
    if not isinstance(values, dict):
        raise ConfigError("config: section 'env' must be a mapping")
    own = {f.name for f in dataclasses.fields(EnvConfig)} - {"options"}
    core = {k: v for k, v in values.items() if k in own}
    rest = {k: v for k, v in values.items() if k not in own}
    options = None
    name = core.get("name", "")
    if name:
        try:
            plugin = manager.get("environment", name)
        except manager.PluginError as e:
            raise ConfigError(f"config: env.name: {e}") from e
        cls = getattr(plugin, "Config", None)
        theirs = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
        for key in rest:
            if key not in theirs:
                raise ConfigError(f"config: unknown key {key!r} in section 'env'{_suggest(key, sorted(own | theirs))}")
        if cls is not None:
            options = build_section("env", cls, rest)
        rest = {}
    for key in rest:
        raise ConfigError(f"config: unknown key {key!r} in section 'env'{_suggest(key, sorted(own))}")
    env = build_section("env", EnvConfig, core)
    return dataclasses.replace(env, options=options) if options is not None else env
