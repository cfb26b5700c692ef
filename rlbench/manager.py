"""The plugin manager: entry points, run-time registration, lazy registries.

Built-in plugins are listed in pyproject.toml under the ``rlbench`` entry-point
group, exactly like third-party ones; nothing here names them.

Environment switches:
  RLBENCH_LOAD_PLUGINS  comma-separated allow-list of entry-point names to load
                        (unset: all). Run-time registrations are always kept.
  RLBENCH_PLUGINS       comma-separated module names imported and registered as plugins at
                        start-up (like PYTEST_PLUGINS): a plugin without packaging, also in
                        every process of an ``accelerate launch`` or a suite.
  RLBENCH_TRACE_PLUGINS set to 1 to print every hook call and result (pluggy tracing).
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from rlbench import hookspecs

GROUP = "rlbench"

# kind -> registration hook name
KINDS = {
    "algorithm": "rlbench_algorithms",
    "engine": "rlbench_rollout_engines",
    "task": "rlbench_tasks",
    "logger": "rlbench_loggers",
    "executor": "rlbench_executors",
    "hook": "rlbench_hook_options",  # the options of event-hook plugins (the config's hooks section)
    "environment": "rlbench_environments",  # multi-turn environments (the config's env section)
}


class PluginError(Exception):
    """A plugin could not be found, loaded or is incompatible."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    target: Any  # "module:object" string or the object itself
    source: str  # the plugin that registered it (entry-point name or "runtime:<name>")

    @property
    def module(self) -> str:
        if isinstance(self.target, str):
            return self.target.split(":")[0]
        return getattr(self.target, "__module__", "?")

    def load(self) -> Any:
        if not isinstance(self.target, str):
            return self.target
        mod_name, _, attr = self.target.partition(":")
        try:
            obj = importlib.import_module(mod_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise PluginError(f"{self.kind} {self.name!r} (from {self.source}) failed to load {self.target!r}: {e}") from e
        return obj


_runtime: list[tuple[str, Any]] = []  # plugins registered with register(), kept across rebuilds
_pm: pluggy.PluginManager | None = None


def _check_api_version(name: str, plugin: Any) -> None:
    declared = getattr(plugin, "RLBENCH_API_VERSION", None)
    if declared is not None and declared != hookspecs.API_VERSION:
        raise PluginError(
            f"plugin {name!r} was written for rlbench hook API version {declared}, "
            f"but this rlbench provides version {hookspecs.API_VERSION}; upgrade the plugin or rlbench"
        )


def _build() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    allow = os.environ.get("RLBENCH_LOAD_PLUGINS")
    allowed = {s.strip() for s in allow.split(",") if s.strip()} if allow is not None else None
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # a broken third-party plugin must say who it is
            raise PluginError(f"entry point {ep.name!r} ({ep.value}) failed to import: {e}") from e
        _check_api_version(ep.name, plugin)
        pm.register(plugin, name=ep.name)
    for mod_name in [m.strip() for m in os.environ.get("RLBENCH_PLUGINS", "").split(",") if m.strip()]:
        if pm.has_plugin(f"env:{mod_name}"):
            continue
        try:
            module = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 - say which variable named it
            raise PluginError(f"RLBENCH_PLUGINS: module {mod_name!r} failed to import: {e}") from e
        _check_api_version(mod_name, module)
        pm.register(module, name=f"env:{mod_name}")
    for name, plugin in _runtime:
        if not pm.has_plugin(name):
            pm.register(plugin, name=name)
    pm.check_pending()  # a hookimpl without a spec (a typo'd hook name) is an error
    if os.environ.get("RLBENCH_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda s: sys.stderr.write(s))
        pm.enable_tracing()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        _pm = _build()
    return _pm


def register(plugin: Any, name: str | None = None) -> str:
    """Register a plugin (module or object with hookimpls) at run time."""
    name = name or getattr(plugin, "__name__", None) or repr(plugin)
    _check_api_version(name, plugin)
    pm = get_plugin_manager()
    full = f"runtime:{name}"
    if pm.has_plugin(full):
        raise PluginError(f"a plugin named {name!r} is already registered")
    pm.register(plugin, name=full)
    try:
        pm.check_pending()  # a hookimpl without a spec (a typo'd hook name) is an error
    except Exception:
        pm.unregister(name=full)
        raise
    _runtime.append((full, plugin))
    return full


@contextmanager
def registered(*plugins: Any):
    """Register plugins for the duration of a ``with`` block (a notebook cell, a test)."""
    names = []
    try:
        for plugin in plugins:
            names.append(register(plugin, name=f"{type(plugin).__name__}-{id(plugin):x}"))
        yield names
    finally:
        for name in names:
            unregister(name)


def unregister(name: str) -> None:
    global _runtime
    _runtime = [(n, p) for n, p in _runtime if n != name]
    pm = get_plugin_manager()
    if pm.has_plugin(name):
        pm.unregister(name=name)


def entries(kind: str | None = None) -> list[Entry]:
    """Every registered plugin object, by kind, with the plugin that registered it."""
    pm = get_plugin_manager()
    out: list[Entry] = []
    for k, hook_name in KINDS.items():
        if kind is not None and k != kind:
            continue
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            result = impl.function()
            for name, target in (result or {}).items():
                out.append(Entry(k, name, target, pm.get_name(impl.plugin) or "?"))
    return sorted(out, key=lambda e: (list(KINDS).index(e.kind), e.name))


def get(kind: str, name: str) -> Any:
    """Resolve and import one plugin object; unknown names list the available ones."""
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")
    found = [e for e in entries(kind) if e.name == name]
    if not found:
        names = sorted({e.name for e in entries(kind)})
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PluginError(f"unknown {kind} {name!r}{hint} Available {kind}s: {', '.join(names) or '(none)'}")
    if len(found) > 1:
        srcs = ", ".join(e.source for e in found)
        # Run-time registrations win over installed ones (tests and notebooks override).
        runtime = [e for e in found if e.source.startswith("runtime:")]
        if not runtime:
            raise PluginError(f"{kind} {name!r} is registered by several plugins: {srcs}")
        found = runtime[-1:]
    return found[0].load()


def provenance(kind: str, name: str) -> dict:
    """Where plugin ``name`` comes from, for manifest.json: its module, the distribution that
    installed it and its version, and the sha256 of its module file (a plugin edited between two
    runs shows as a different hash in the report's infrastructure check)."""
    import hashlib
    import inspect
    from importlib import metadata

    obj = get(kind, name)
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "?")
    if inspect.ismodule(obj):
        module = obj.__name__
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    digest = None
    if path:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
    dists = metadata.packages_distributions().get(module.split(".")[0], [])
    version = None
    if dists:
        try:
            version = metadata.version(dists[0])
        except metadata.PackageNotFoundError:
            pass
    return {"name": name, "module": module, "distribution": dists[0] if dists else None, "version": version,
            "file_sha256": digest}


def hook():
    return get_plugin_manager().hook
