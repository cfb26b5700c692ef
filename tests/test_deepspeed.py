"""DeepSpeed ZeRO-2 and ZeRO-3 (configs/accelerate/zero2.yaml, zero3.yaml as shipped): 2 CPU
processes (DeepSpeed's CPU accelerator over gloo) against 1 process without DeepSpeed on the same
global batch. The run makes the two ranks unequal on purpose:
  * one prompt of rank 1's shard is too long and skipped on every step, so rank 1 holds one
    micro-batch and rank 0 two: DeepSpeed's gradient reductions are collectives, so the trainer
    pads rank 1 with a zero-loss backward (a hang or a wrong gradient without it);
  * on step 2 the loss is NaN on rank 1 alone: both ranks must discard that step, like the single
    process that sees the NaN.
Steps 1, 3 and 4 must then match the single process (loss, gradient norm, KL, learning rate),
replicas must hold identical weights, and a DeepSpeed checkpoint must resume (same world size)."""
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from rlbench import rundir
from rlbench.suites import jobs

from test_distributed import RUN, ROOT, _close, _run

DS_RUN = {**RUN,
          "task": {"name": "first_char_long", "long_ids": ["train3"]},
          "rollout": {**RUN["rollout"], "max_prompt_tokens": 100},  # prompts: 33 tokens, train3: 660
          "algorithm": {"name": "rank_nan_grpo", "beta": 0.05, "nan_step": 2, "nan_rank": 1},
          "train": {**RUN["train"], "steps": 4, "warmup_steps": 1, "min_lr_ratio": 0.5}}


def _launch_ds(stage: int, args: list[str], log: Path) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    _run([str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"zero{stage}.yaml"),
          "--main_process_port", str(jobs.free_port()),  # another test file's launch may hold 29500 (pytest-xdist)
          "-m", "rlbench.cli", "run", *args], log)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    one = {**DS_RUN, "algorithm": {**DS_RUN["algorithm"], "nan_rank": 0}}  # the only process sees the NaN
    (tmp / "one.yaml").write_text(yaml.safe_dump(one))
    (tmp / "ds.yaml").write_text(yaml.safe_dump(DS_RUN))
    _run([sys.executable, "-m", "rlbench.cli", "run", str(tmp / "one.yaml"), "--out", str(tmp / "one")], tmp / "one.log")
    for stage in (2, 3):
        _launch_ds(stage, [str(tmp / "ds.yaml"), "--out", str(tmp / f"zero{stage}")], tmp / f"zero{stage}.log")
    return tmp


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_on_the_global_batch_like_one_process(runs, stage):
    one = rundir.read_jsonl(runs / "one" / "d" / "metrics.jsonl")
    ds = rundir.read_jsonl(runs / f"zero{stage}" / "d" / "metrics.jsonl")
    assert [m["step"] for m in ds] == [1, 2, 3, 4]
    manifest = yaml.safe_load((runs / f"zero{stage}" / "d" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    state = yaml.safe_load((runs / f"zero{stage}" / "d" / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["deepspeed"] == {"zero_stage": stage, "world_size": 2}  # DeepSpeed really ran (not plain DDP)
    assert (runs / f"zero{stage}" / "d" / "checkpoints" / "step_000004" / "deepspeed").is_dir()
    # the long prompt was skipped on every step (rank 1: 4 rows, one micro-batch; rank 0: two)
    assert ds[-1]["prompts/skipped_total"] == one[-1]["prompts/skipped_total"] == 4.0
    # step 2: NaN on rank 1 only; both ranks skipped it, as the single process did
    assert one[1].get("nonfinite/skipped") == ds[1].get("nonfinite/skipped") == 1.0
    faults = rundir.read_jsonl(runs / f"zero{stage}" / "d" / "faults.jsonl")
    assert [(f["step"], f["where"]) for f in faults] == [(2, "loss")]
    for a, b in zip(one, ds):
        if a["step"] == 2:
            continue
        assert b["dist/param_checksum_spread"] == 0.0, b  # replicas hold the same weights
        for k in ["reward/mean", "reward/std", "completion_len/mean", "tokens/generated_total", "lr"]:
            assert a[k] == b[k], (stage, a["step"], k, a[k], b[k])
        for k in ["loss", "grad_norm", "kl", "entropy"]:
            assert _close(a[k], b[k], rel=1e-4, abs_=1e-6), (stage, a["step"], k, a[k], b[k])
    assert one[0]["grad_norm"] > 0 and one[2]["kl"] > 0  # the steps moved the policy
    assert len({m["lr"] for m in one if "lr" in m}) > 1  # a schedule that changes: stepped once per update
    e1, e2 = (rundir.read_jsonl(runs / r / "d" / "eval.jsonl") for r in ("one", f"zero{stage}"))
    assert [e["step"] for e in e2] == [0, 4]
    for a, b in zip(e1, e2):
        assert a["ids"] == b["ids"] and a["correct"] == b["correct"]
        assert _close(a["kl"], b["kl"], rel=1e-4, abs_=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_final_weights_match_one_process(runs, stage):
    import torch
    from safetensors.torch import load_file

    a = load_file(str(runs / "one" / "d" / "checkpoints" / "step_000004" / "model.safetensors"))
    b = load_file(str(runs / f"zero{stage}" / "d" / "checkpoints" / "step_000004" / "model.safetensors"))
    first = load_file(str(runs / "one" / "d" / "checkpoints" / "step_000001" / "model.safetensors"))
    assert a.keys() == b.keys()

    def norm(d):
        return sum(t.double().square().sum() for t in d.values()).sqrt().item()

    moved = norm({k: a[k] - first[k] for k in a})  # steps 3 and 4 (step 2 was skipped)
    assert moved > 1.0
    # the same weights up to float32 reduction order, which Adam's g/√v magnifies on near-zero
    # gradients (measured: 3e-5 of the movement, largest element 3e-4 of a 1e-2 step)
    assert norm({k: a[k] - b[k] for k in a}) < 1e-3 * moved
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-3
    assert all(torch.isfinite(v).all() for v in b.values())


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])  # ZeRO-3 partitions more: the default run keeps it
def test_a_zero_checkpoint_resumes_with_its_partitioned_optimizer_state(runs, stage, tmp_path):
    resumed = tmp_path / "d"
    shutil.copytree(runs / f"zero{stage}" / "d", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    (resumed / "cost.json").unlink()
    _launch_ds(stage, ["--resume", str(resumed)], tmp_path / "resume.log")
    full = rundir.read_jsonl(runs / f"zero{stage}" / "d" / "metrics.jsonl")
    again = rundir.read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for k in ["reward/mean", "completion_len/mean", "lr"]:
        assert again[-1][k] == full[-1][k]
    # AdamW's moments came back from every rank's partition: the step-4 update is the same
    for k in ["loss", "grad_norm", "kl"]:
        assert _close(again[-1][k], full[-1][k], rel=1e-5), (k, again[-1][k], full[-1][k])


def test_a_zero_checkpoint_refuses_another_world_size_with_the_reason(runs, tmp_path):
    import subprocess

    from test_distributed import _env

    resumed = tmp_path / "d"
    shutil.copytree(runs / "zero2" / "d", resumed)
    (resumed / "cost.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    out = subprocess.run([sys.executable, "-m", "rlbench.cli", "run", "--resume", str(resumed)], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "was written with DeepSpeed ZeRO-2 on 2 processes and this run is without DeepSpeed" in out.stderr, \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert [m["step"] for m in rundir.read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3, 4]  # nothing lost


def test_lora_under_zero2_matches_one_process(tmp_path):
    """LoRA adapters as the only trainable parameters in ZeRO-2's partitioned optimizer."""
    lora = {**RUN, "model": {**RUN["model"], "lora_rank": 8},
            "train": {**RUN["train"], "warmup_steps": 1, "min_lr_ratio": 0.5}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    _run([sys.executable, "-m", "rlbench.cli", "run", str(tmp_path / "lora.yaml"), "--out", str(tmp_path / "one")],
         tmp_path / "one.log")
    _launch_ds(2, [str(tmp_path / "lora.yaml"), "--out", str(tmp_path / "z2")], tmp_path / "z2.log")
    one = rundir.read_jsonl(tmp_path / "one" / "d" / "metrics.jsonl")
    ds = rundir.read_jsonl(tmp_path / "z2" / "d" / "metrics.jsonl")
    assert [m["step"] for m in ds] == [1, 2, 3]
    assert one[-1]["kl"] > 0  # the adapters moved the policy
    for a, b in zip(one, ds):
        assert b["dist/param_checksum_spread"] == 0.0
        assert a["reward/mean"] == b["reward/mean"] and a["lr"] == b["lr"]
        for k in ["loss", "grad_norm", "kl"]:
            assert _close(a[k], b[k], rel=1e-4, abs_=1e-6), (a["step"], k, a[k], b[k])


def test_zero3_gathers_the_shards_for_each_ranks_vllm_engine(tmp_path):
    """Each rank's vLLM engine gets the whole weights gathered from the ZeRO-3 shards after every
    update: the trainer's drift check (sampler vs trainer logprobs of the sampled tokens) passes
    on every step, with the policy moving away from the reference."""
    pytest.importorskip("vllm")
    run = {**RUN, "engine": {"name": "vllm", "kv_cache_gb": 1}}
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(run))
    _launch_ds(3, [str(tmp_path / "v.yaml"), "--out", str(tmp_path / "z3")], tmp_path / "z3.log")
    ds = rundir.read_jsonl(tmp_path / "z3" / "d" / "metrics.jsonl")
    assert [m["step"] for m in ds] == [1, 2, 3]
    assert all(m["sync/logprob_drift"] < 1e-4 for m in ds), [m["sync/logprob_drift"] for m in ds]
    assert ds[1]["kl"] > 0.1 and ds[2]["kl"] > 0.1  # the engine followed a policy that moved
    assert all(m["dist/param_checksum_spread"] == 0.0 for m in ds)


def test_a_critic_under_deepspeed_is_refused_at_start(tmp_path):
    import subprocess

    from test_distributed import _env

    ppo = {**RUN, "algorithm": {"name": "ppo"}}
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(ppo))
    accelerate = Path(sys.executable).with_name("accelerate")
    out = subprocess.run([str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "zero2.yaml"),
                          "--main_process_port", str(jobs.free_port()),
                          "-m", "rlbench.cli", "run", str(tmp_path / "ppo.yaml"), "--out", str(tmp_path / "r")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "DeepSpeed with an algorithm that trains a critic (ppo) is not supported" in out.stderr + out.stdout
    assert not (tmp_path / "r" / "d" / "metrics.jsonl").exists()
