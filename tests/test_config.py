"""Strict config validation: typos name the key, its section and the closest valid key; a validated
config is frozen."""
import json

import pytest

from rlbench import config
from rlbench.config import ConfigError

from conftest import TINY, tiny_config


def test_typo_in_core_section_names_key_section_and_suggestion():
    with pytest.raises(ConfigError) as e:
        tiny_config("train.learning_rte=0.1")
    assert "'learning_rte'" in str(e.value) and "'train'" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in section 'train'; did you mean 'lr'\?"):
        tiny_config("train.lrr=0.1")


def test_typo_in_plugin_section_uses_the_plugins_own_options():
    with pytest.raises(ConfigError, match=r"unknown key 'betta' in section 'algorithm'; did you mean 'beta'\?"):
        tiny_config("algorithm.betta=0.1")
    with pytest.raises(ConfigError, match=r"unknown key 'digit' in section 'task'; did you mean 'digits'\?"):
        tiny_config("task.digit=3")


def test_unknown_section_and_unknown_plugin():
    with pytest.raises(ConfigError, match=r"unknown section 'trian'; did you mean 'train'\?"):
        config.resolve({**TINY, "trian": {}})
    with pytest.raises(ConfigError) as e:
        tiny_config("algorithm.name=grpoo")
    assert "did you mean 'grpo'" in str(e.value) and "Available algorithms: " in str(e.value) and "grpo," in str(e.value)


def test_types_and_ranges_are_checked():
    with pytest.raises(ConfigError, match=r"train.steps must be int, got str 'many'"):
        tiny_config("train.steps=many")
    with pytest.raises(ConfigError, match=r"loss_agg must be one of seq_mean, token_mean, constant_length; got 'mean'"):
        tiny_config("algorithm.loss_agg=mean")
    with pytest.raises(ConfigError, match="operations"):
        tiny_config("task.operations=['/']")
    # YAML 1.1 reads 3e-3 as a string; a float field accepts it, an int is widened
    cfg = tiny_config("train.lr=3e-3", "algorithm.beta=1")
    assert cfg.train.lr == 0.003 and cfg.algorithm.beta == 1.0 and isinstance(cfg.algorithm.beta, float)


def test_set_overrides_and_round_trip(tmp_path):
    cfg = tiny_config("rollout.group_size=6", "task.operations=['+', '*']")
    assert cfg.rollout.group_size == 6 and cfg.task.operations == ["+", "*"]
    path = tmp_path / "c.yaml"
    config.dump(cfg, path)
    again = config.load(path)
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="section.key=value"):
        tiny_config("train.lr")


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_every_shipped_yaml_is_loaded_and_validated():
    """Every YAML under configs/ goes through the loader its users' commands use: run configs
    (configs/*.yaml, configs/gpu/*.yaml) through the strict config loader, suites through the
    suite loader (every run of the matrix resolved), accelerate configs through accelerate's. A
    YAML that none of them reads fails the test."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    from rlbench.suites import suite

    root = Path(__file__).resolve().parent.parent / "configs"
    seen = set()
    for path in sorted(root.glob("*.yaml")) + sorted((root / "gpu").glob("*.yaml")) + sorted((root / "tasks").glob("*.yaml")):
        cfg = config.load(path)
        assert config.resolve(cfg.to_dict()).to_dict() == cfg.to_dict(), path  # the written-out form is valid too
        seen.add(path)
    for path in sorted((root / "suites").glob("*.yaml")):
        runs = suite.expand(suite.load(path))
        names = [name for name, _ in runs]
        assert runs and len(set(names)) == len(names), path  # every cell resolved, each with its own run directory
        seen.add(path)
    for path in sorted((root / "accelerate").glob("*.yaml")):
        c = load_config_from_file(str(path))  # unknown keys or values are errors there
        if "zero" in path.stem:
            assert c.distributed_type == "DEEPSPEED" and c.deepspeed_config["zero_stage"] == int(path.stem[-1]), path
        else:
            assert c.distributed_type == "MULTI_GPU" and c.num_processes >= 2, path
        seen.add(path)
    assert seen == set(root.rglob("*.yaml"))
    for path in sorted((root.parent / "examples").glob("*/config.yaml")):  # the examples' configs too
        assert config.load(path).to_dict()
    assert config.load(root / "quickstart.yaml").names == {"task": "arithmetic", "engine": config.auto_engine(),
                                                          "engine_requested": "auto", "algorithm": "grpo"}


def test_a_validated_config_is_never_assigned_to(tmp_path, monkeypatch):
    import dataclasses

    from rlbench.training.trainer import start

    cfg = tiny_config("train.steps=2", "eval.every=1", "rollout.batch_invariant_sampling=auto")
    for section in ("run", "model", "rollout", "train", "eval", "logging"):  # the core's sections are frozen
        name = dataclasses.fields(getattr(cfg, section))[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, section), name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None
    # plugin sections are the plugins' own dataclasses: made read-only here, a whole run (rollouts,
    # update, evaluation, checkpoints, the resolved batch invariance) must only read them
    def read_only(obj, key, value):
        raise AssertionError(f"{type(obj).__name__}.{key} assigned after validation")

    for section in ("task", "engine", "algorithm"):
        monkeypatch.setattr(type(getattr(cfg, section)), "__setattr__", read_only)
    tr = start(cfg, tmp_path / "r")
    tr.run()
    tr.close()
    assert cfg.rollout.batch_invariant_sampling == "auto"  # resolved in the manifest, not in the config
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["batch_invariant_sampling"] is True
