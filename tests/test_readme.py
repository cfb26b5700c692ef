"""Every option name the README mentions exists: ``section.key`` in the text, the keys of its YAML
config examples (each example is validated by the config code), and ``name`` + default pairs."""
import dataclasses
import re
from pathlib import Path

import yaml

from rlbench import config, manager
from rlbench.config_env import EnvConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SECTIONS = {**config.CORE_SECTIONS, "env": EnvConfig}
PLUGIN_KINDS = {"task": "task", "engine": "engine", "algorithm": "algorithm", "env": "environment"}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _section_keys(section: str) -> set[str]:
    keys = _fields(SECTIONS[section]) if section in SECTIONS else {"name", "label"}
    if section in PLUGIN_KINDS:
        for e in manager.entries(PLUGIN_KINDS[section]):
            cls = getattr(e.load(), "Config", None)
            if cls is not None:
                keys |= _fields(cls)
        keys |= {"name", "label"}
    return keys


def _all_option_names() -> set[str]:
    names = set()
    for sec in list(SECTIONS) + list(PLUGIN_KINDS):
        names |= _section_keys(sec)
    for kind in ("executor", "hook"):
        for e in manager.entries(kind):
            obj = e.load()
            cls = getattr(obj, "Config", obj if dataclasses.is_dataclass(obj) else None)
            if cls is not None:
                names |= _fields(cls)
    return names


NOT_OPTIONS = {"eval.jsonl", "model.safetensors"} | {f"{sec}.{key}" for sec, key in config.RENAMED}  # files; renamed keys


def test_dotted_option_names_exist():
    mentioned = set(re.findall(r"`((?:run|model|task|engine|rollout|algorithm|train|eval|logging|env)\.([a-z_]+))(?![\w(])",
                               README))
    assert mentioned, "the README mentions no section.key"
    missing = sorted(full for full, key in mentioned
                     if key not in _section_keys(full.split(".")[0]) and full not in NOT_OPTIONS)
    assert missing == [], f"README mentions options no config has: {missing}"


def test_yaml_config_examples_are_valid_configs():
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    checked = 0
    for block in blocks:
        try:
            raw = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        if not isinstance(raw, dict) or not set(raw) & (set(SECTIONS) | set(PLUGIN_KINDS)) or "matrix" in raw:
            continue
        if not set(raw) <= set(SECTIONS) | set(PLUGIN_KINDS) | {"hooks"}:
            continue
        raw = {k: v for k, v in raw.items()}
        for sec, values in raw.items():  # options only: names of files or factories may not exist here
            assert isinstance(values, dict), (sec, block)
            unknown = set(values) - _section_keys(sec) - {"factory"}
            assert not unknown, f"README YAML example uses unknown {sec} keys {sorted(unknown)}:\n{block}"
        checked += 1
    assert checked >= 2


def test_option_defaults_named_in_prose_exist():
    """"`beta` 0.04"-style mentions: the name is an option of some config; in an algorithm's own
    section ("GRPO as implemented"), an option of that algorithm."""
    names = _all_option_names()
    pairs = re.findall(r"`([a-z][a-z0-9_]*)` (?:is |= )?(-?\d[\d.e-]*)\b", README)
    assert pairs
    unknown = sorted({n for n, _ in pairs if n not in names and n not in ("env_mask", "completion_mask")})
    assert unknown == [], f"README names defaults of options that do not exist: {unknown}"
    grpo_section = README.split("## GRPO as implemented", 1)[1].split("\n## ", 1)[0]
    grpo = _fields(manager.get("algorithm", "grpo").Config)
    named = set(re.findall(r"`([a-z][a-z0-9_]*)` (?:is |= )?(?:-?\d[\d.e-]*)\b", grpo_section))
    assert named and named <= grpo, f"the GRPO section names defaults GRPO has no option for: {sorted(named - grpo)}"
