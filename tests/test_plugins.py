"""The plugin system: entry points, listing, lazy imports, API versions, hook docs and tests."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import rlbench
from rlbench import hookspecs, manager

HOOKS = [name for name in dir(hookspecs) if name.startswith("rlbench_")]


def _cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "rlbench.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_plugins_json_lists_builtins_with_their_sources():
    r = _cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    got = {(x["kind"], x["name"]) for x in rows}
    algorithms = ["grpo", "ppo", "dpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"]
    for want in [*(("algorithm", a) for a in algorithms), ("engine", "hf"), ("engine", "vllm"),
                 ("task", "arithmetic"), ("task", "gsm8k"), ("task", "math"), ("task", "humaneval"),
                 ("logger", "tensorboard"), ("logger", "wandb")]:
        assert want in got, want
    grpo = next(x for x in rows if x["name"] == "grpo")
    assert grpo["module"] == "rlbench.plugins.algorithms.grpo" and grpo["source"] == "grpo"
    text = _cli("plugins").stdout
    assert "algorithms:" in text and "grpo" in text and "(from grpo)" in text


def test_builtins_come_from_the_entry_point_group():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="rlbench")}
    assert {"grpo", "hf", "arithmetic", "tensorboard", "wandb"} <= names
    # the core names no built-in plugin: they are all found through entry points
    core = Path(rlbench.__file__).parent
    for f in core.glob("*.py"):
        assert "plugins.algorithms.grpo" not in f.read_text(), f


def test_importing_the_core_never_imports_heavy_backends():
    code = ("import sys, rlbench, rlbench.manager, rlbench.config, rlbench.training.trainer; "
            "rlbench.manager.entries(); "
            "print([m for m in ('vllm', 'deepspeed', 'bitsandbytes', 'wandb', 'submitit', 'ray') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_allow_list_env_var_limits_loaded_plugins():
    r = _cli("plugins", "--json", env={"RLBENCH_LOAD_PLUGINS": "grpo,hf"})
    names = {x["name"] for x in json.loads(r.stdout)}
    assert names == {"grpo", "hf"}


def test_plugins_env_var_registers_modules_without_packaging():
    import os

    tests_dir = str(Path(__file__).resolve().parent)
    env = {"RLBENCH_PLUGINS": "rlbench_testing_plugins", "PYTHONPATH": tests_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = json.loads(_cli("plugins", "--json", env=env).stdout)
    assert {"kind": "task", "name": "first_char", "source": "env:rlbench_testing_plugins"}.items() <= \
        next(r for r in rows if r["name"] == "first_char").items()
    r = _cli("plugins", env={"RLBENCH_PLUGINS": "no_such_plugin_module"})
    assert r.returncode == 2
    assert "RLBENCH_PLUGINS: module 'no_such_plugin_module' failed to import: No module named" in r.stderr


def test_registered_context_manager_unregisters_on_exit():
    with manager.registered(_Named()) as names:
        assert manager.get("task", "named_test_task") is dict
    assert not any(manager.get_plugin_manager().has_plugin(n) for n in names)
    with pytest.raises(manager.PluginError, match="unknown task 'named_test_task'"):
        manager.get("task", "named_test_task")


class _Named:
    @rlbench.hookimpl
    def rlbench_tasks(self):
        return {"named_test_task": dict}


class _OldPlugin:
    RLBENCH_API_VERSION = hookspecs.API_VERSION + 1

    @rlbench.hookimpl
    def rlbench_algorithms(self):
        return {}


def test_api_version_mismatch_is_a_clear_error():
    v = hookspecs.API_VERSION
    with pytest.raises(manager.PluginError, match=rf"hook API version {v + 1}, but this rlbench provides version {v}"):
        manager.register(_OldPlugin(), name="old")


class _Typo:
    @rlbench.hookimpl
    def rlbench_algorithmz(self):
        return {}


def test_hookimpl_without_spec_is_rejected():
    from pluggy import PluginValidationError

    with pytest.raises(PluginValidationError, match="rlbench_algorithmz"):
        manager.register(_Typo(), name="typo")
    assert not manager.get_plugin_manager().has_plugin("runtime:typo")


def test_unknown_plugin_lists_available_and_suggests():
    with pytest.raises(manager.PluginError, match=r"unknown engine 'hff'; did you mean 'hf'\? Available engines: hf"):
        manager.get("engine", "hff")


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_and_tested(hook):
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert len(doc.strip()) > 40, f"{hook} needs a docstring"
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    assert f"def test_hook_{hook}" in tests, f"{hook} needs a test named test_hook_{hook}"


PROTOCOLS = {"algorithm": "Algorithm", "engine": "RolloutEngine", "task": "Task", "logger": "Logger",
             "executor": "Executor", "environment": "Environment"}


def test_hooks_are_typed_with_the_protocols_and_every_builtin_provides_its_own():
    import dataclasses
    import typing

    import torch

    from rlbench import config, types

    names = {**vars(hookspecs), **vars(types), "rlbench": rlbench, "torch": torch}
    assert config.Config  # rlbench.config is imported: the hooks name rlbench.config.Config
    for hook in HOOKS:  # every annotation resolves; no argument is left untyped
        fn = getattr(hookspecs, hook)
        hints = typing.get_type_hints(fn, globalns=names)
        assert set(hints) == set(fn.__code__.co_varnames[:fn.__code__.co_argcount]) | {"return"}, hook
    for kind, hook in manager.KINDS.items():  # a registration hook names its kind's protocol ...
        if kind == "hook":  # an event-hook plugin's options: a dataclass, like every config section
            assert all(dataclasses.is_dataclass(e.load()) for e in manager.entries(kind))
            continue
        protocol = getattr(types, PROTOCOLS[kind])
        assert str(typing.get_type_hints(getattr(hookspecs, hook), globalns=names)["return"]).endswith(
            f"str | type[rlbench.types.{PROTOCOLS[kind]}]]"), hook
        members = {m for m in vars(protocol) if not m.startswith("_")} | set(protocol.__annotations__)
        entries = manager.entries(kind)
        assert entries, kind
        for entry in entries:  # ... and every built-in has the protocol's members
            obj = entry.load()
            missing = {m for m in members if not hasattr(obj, m) and m not in getattr(obj, "__annotations__", {})}
            assert not missing, f"{kind} {entry.name}: missing {sorted(missing)}"
