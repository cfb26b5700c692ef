"""The CLI end to end on configs/smoke.yaml: run directory, export, resume, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def rlbench(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "rlbench.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    if check and r.returncode != 0:
        raise AssertionError(f"rlbench {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    rlbench("run", "configs/smoke.yaml", "--out", str(out))
    return out / "smoke"


def test_smoke_run_leaves_the_documented_run_directory(smoke_run):
    for f in ["config.yaml", "manifest.json", "metrics.jsonl", "eval.jsonl", "cost.json"]:
        assert (smoke_run / f).is_file(), f
    metrics = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ["step", "reward/mean", "reward/accuracy", "reward/format", "kl", "loss", "grad_norm",
                "completion_len/mean", "time/rollout", "time/reward", "time/train", "tokens/generated"]:
        assert key in metrics[0], key
    evals = [json.loads(line) for line in (smoke_run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and all(e["n"] == 32 and "accuracy" in e for e in evals)
    # exact KL to the reference: 0 before training; after it, positive exactly when training moved the weights
    assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    from safetensors.torch import load_file

    from rlbench.modeling import models
    initial = models.tiny_random(models.load_tokenizer("tiny-random"), seed=0).state_dict()
    final = load_file(str(smoke_run / "checkpoints" / "step_000003" / "model.safetensors"))
    moved = max((final[k] - initial[k]).abs().max().item() for k in final)
    assert (evals[1]["kl"] > 1e-7) == (moved > 1e-5), (evals[1]["kl"], moved)
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and manifest["seed"] == 0 and manifest["engine"] == "hf"
    assert manifest["model"]["name"] == "tiny-random" and manifest["model"]["hash"]
    cost = json.loads((smoke_run / "cost.json").read_text())
    assert cost["tokens_generated"] == sum(m["tokens/generated"] for m in metrics)
    assert cost["flops_estimate"] > 0 and cost["wall_seconds"]["train"] > 0
    from rlbench.training.cost import price_table
    prices, source = price_table()  # the table shipped in the package
    assert source == cost["price_table"] == "rlbench/prices.yaml" and prices["cpu_core_hour"] > 0
    assert cost["device_hours_unit"] == "cpu-core-hours"
    assert cost["price_usd"] == pytest.approx(cost["device_hours"] * prices["cpu_core_hour"]) and cost["price_usd"] > 0
    assert sorted(p.name for p in (smoke_run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert list((smoke_run / "tensorboard").glob("events.out.tfevents.*"))


def test_export_loads_with_transformers_and_answers(smoke_run, tmp_path):
    rlbench("export", str(smoke_run), "--out", str(tmp_path / "hf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlbench import config, manager

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template and (tmp_path / "hf" / "model.safetensors").is_file()
    # the exported weights are the trained ones, not the initial ones
    from safetensors.torch import load_file
    trained = load_file(str(smoke_run / "checkpoints" / "step_000003" / "model.safetensors"))
    k = "model.layers.0.mlp.down_proj.weight"
    assert (model.state_dict()[k] - trained[k]).abs().max().item() == 0
    cfg = config.load(smoke_run / "config.yaml")
    task = manager.get("task", "arithmetic")(cfg.task, tok)
    problem = task.prompts("test", 1, seed=0)[0]
    ids = tok(problem.text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # the exported model answers as the trained policy does: the checkpoint's weights in rlbench's own model
    from rlbench.modeling import models
    policy, _ = models.load("tiny-random")
    policy.load_state_dict(trained, strict=False)
    policy.tie_weights()
    expected = policy.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1] and out.tolist() == expected.tolist()
    assert set(task.score([problem], [answer])) == {"accuracy", "format"}


def test_resume_from_cli_continues_after_the_last_checkpoint(smoke_run, tmp_path):
    import shutil

    run = tmp_path / "smoke"
    shutil.copytree(smoke_run, run)
    shutil.rmtree(run / "checkpoints" / "step_000003")  # as if killed during step 3
    (run / "cost.json").unlink()  # (a killed run never wrote it: cost.json marks a finished run)
    r = rlbench("run", "--resume", str(run), "--set", "logging.progress=false")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    a = [json.loads(x) for x in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert b[2]["loss"] == pytest.approx(a[2]["loss"], abs=1e-6) and b[2]["reward/mean"] == a[2]["reward/mean"]


def test_resuming_a_finished_run_changes_no_file(smoke_run, tmp_path):
    import hashlib
    import shutil

    run = tmp_path / "smoke"
    shutil.copytree(smoke_run, run)

    def files():
        return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(run.rglob("*")) if p.is_file()}
    before = files()
    r = rlbench("run", "--resume", str(run))
    assert "nothing to resume: it finished at step 3 (train.steps = 3)" in r.stderr
    assert files() == before
    r = rlbench("run", "--resume", str(run), "--set", "train.steps=4", "--set", "logging.progress=false")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # a raised train.steps continues it


def test_version_config_and_env_commands(tmp_path):
    import yaml

    assert rlbench("--version").stdout.startswith("rlbench 0.")
    cfg = yaml.safe_load(rlbench("config", "configs/smoke.yaml", "--set", "train.steps=7").stdout)
    assert cfg["train"]["steps"] == 7 and cfg["train"]["lr"] > 0 and cfg["task"]["name"] == "arithmetic"
    as_json = json.loads(rlbench("config", "configs/smoke.yaml", "--json").stdout)
    assert as_json["algorithm"]["name"] == "grpo"
    env = json.loads(rlbench("env", "--json").stdout)
    assert env["torch"].startswith("2.") and env["device"].startswith(("cpu", "cuda"))
    assert {"kind": "task", "name": "arithmetic", "from": "arithmetic", "module": "rlbench.tasks.arithmetic"} in env["plugins"]
    r = rlbench("suite", "status", "/nonexistent-suite", check=False)
    assert r.returncode == 2 and r.stderr.startswith("rlbench: error: no suite status under /nonexistent-suite")


def test_a_run_that_does_not_use_deepspeed_never_imports_it(tmp_path):
    code = ("import sys, tempfile\nfrom conftest import tiny_config\nfrom rlbench.training import trainer\n"
            "t = trainer.start(tiny_config('train.steps=1', 'train.checkpoint_every=1'), tempfile.mkdtemp() + '/r')\n"
            "t.run(); t.close()\nprint('deepspeed' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests", timeout=600,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
    assert "Setting accelerator to CPU" not in r.stderr


def test_eval_takes_several_tasks(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlbench.cli", "eval", "--tasks", "arithmetic,gsm8k", "--model",
                          "tiny-random", "--engine", "hf", "--limit", "2", "--max-tokens", "2"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "eval-arithmetic-test.json").is_file() and (tmp_path / "eval-gsm8k-test.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "rlbench.cli", "eval", "--tasks", "arithmetic,gsm8", "--model",
                          "tiny-random"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert bad.returncode == 2 and "unknown task 'gsm8'; did you mean 'gsm8k'?" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
    (["run", "configs/smoke.yaml", "--set", "train.stpes=3"], "unknown key 'stpes' in section 'train'; did you mean 'steps'?"),
    (["run", "configs/smoke.yaml", "--set", "engine.name=vlm"], "unknown engine 'vlm'"),
    (["run", "configs/smoke.yaml", "--set", "model.name=./no/such/model"], "model path does not exist: ./no/such/model"),
    (["export", "/nonexistent-run", "--out", "/tmp/x"], "is not a run directory"),
])
def test_bad_input_gives_a_clear_error(args, message, tmp_path):
    r = rlbench(*args, "--out", str(tmp_path), check=False) if args[0] == "run" else rlbench(*args, check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
