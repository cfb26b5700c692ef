"""Off-policy training: the corrections (truncated / masked / decoupled importance weights), the
cispo algorithm, and asynchronous rollouts (rollout.off_policy_steps = k) with the hf engine:
which weights generated each trained batch, reproducibility, the overlap, the verified push, and
SIGKILL + resume."""
import json
import math
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from rlbench import config, manager, ops, rundir
from rlbench.training import setup
from rlbench.training.async_rollouts import Version, behavior_version
from rlbench.training.cost import CostMeter
from rlbench.plugins.algorithms.cispo import CISPO, CISPOConfig
from rlbench.plugins.engines.hf import HFEngine
from rlbench.training.sampler import EngineSpec, Sampler
from rlbench.training.trainer import Trainer, TrainingError, start
from rlbench.seeds import batch_seed
from rlbench.types import StepContext, TrainBatch

import rlbench
from conftest import tiny_config

# -- the corrections, by hand -----------------------------------------------------------------------

LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, 0.0]])  # [2, 3]; row 1 has 2 real tokens
BEHAV = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -3.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _close(t, want):
    return torch.allclose(t, torch.tensor(want), rtol=1e-6, atol=1e-7)


# ρ = exp(logp − behav): row 0: e^0.5 = 1.6487, e^−1 = 0.3679, 1; row 1: e^−0.5 = 0.6065, e^2 = 7.389


def test_truncated_weights_cap_the_ratio():
    w, zeroed = ops.behavior_weights(LOGP, BEHAV, MASK, "truncate", cap=2.0)
    want = [[math.exp(0.5), math.exp(-1.0), 1.0], [math.exp(-0.5), 2.0, 0.0]]
    assert _close(w, want)
    assert zeroed.sum() == 0


def test_masked_weights_drop_tokens_outside_the_bounds():
    # [0.5, 2.0]: 0.3679 (too small) and 7.389 (too large) are zeroed, the rest keep their ratio
    w, zeroed = ops.behavior_weights(LOGP, BEHAV, MASK, "mask", cap=2.0, low=0.5)
    assert _close(w, [[math.exp(0.5), 0.0, 1.0], [math.exp(-0.5), 0.0, 0.0]])
    assert zeroed.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]  # padding is never counted
    # sequence level: ρ_seq = exp(Σ log ρ): row 0 e^(0.5 − 1 + 0) = 0.6065 kept; row 1 e^(−0.5 + 2) = 4.48 dropped
    w, zeroed = ops.behavior_weights(LOGP, BEHAV, MASK, "mask", cap=2.0, low=0.5, level="sequence")
    assert _close(w, [[math.exp(-0.5)] * 3, [0.0, 0.0, 0.0]])
    assert zeroed.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    # through the config: low 0 means 1 / cap
    c = ops.Correction("mask", 4.0)
    w, _ = c.weights(LOGP, BEHAV, MASK)
    assert w[0, 1].item() == pytest.approx(math.exp(-1.0)) and w[1, 1].item() == 0.0  # 0.37 ≥ 0.25; 7.4 > 4


def test_bounds_are_inclusive_and_defaults_are_token_level_with_no_lower_bound():
    same = torch.tensor([[-1.0, -2.0]])
    w, zeroed = ops.behavior_weights(same, same, torch.ones(1, 2), "mask", cap=1.0, low=1.0)  # ρ = 1 = both bounds
    assert w.tolist() == [[1.0, 1.0]] and zeroed.sum() == 0
    w, _ = ops.behavior_weights(LOGP, BEHAV, MASK, "mask", cap=2.0)  # no low given: 0, so 0.3679 stays
    assert w[0, 1].item() == pytest.approx(math.exp(-1.0))
    # Correction: low 0 means 1 / cap (0.25 here, so 0.135 is dropped), and its level reaches the weights
    tiny = torch.tensor([[-2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2)
    assert ops.Correction("mask", 4.0).weights(*tiny)[0].tolist() == [[0.0, 1.0]]
    seq = ops.Correction("mask", 2.0, 0.5, "sequence").weights(LOGP, BEHAV, MASK)[0]
    assert _close(seq, [[math.exp(-0.5)] * 3, [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"^behavior_weights: mode must be one of truncate, mask, decoupled; got 'x'$"):
        ops.behavior_weights(LOGP, BEHAV, MASK, "x", cap=2.0)


def test_decoupled_weights_are_the_behaviour_to_proximal_ratio_capped_by_masking():
    prox = LOGP  # the proximal policy's logprobs take the place of the current ones
    w, zeroed = ops.behavior_weights(prox, BEHAV, MASK, "decoupled", cap=5.0)
    # no lower bound: 0.3679 stays; 7.389 > 5 is masked (AReaL filters, it does not truncate)
    assert _close(w, [[math.exp(0.5), math.exp(-1.0), 1.0], [math.exp(-0.5), 0.0, 0.0]])
    assert zeroed.tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.behavior_weights(prox, BEHAV, MASK, "clip", cap=5.0)


def test_decoupled_objective_of_the_grpo_family_by_hand():
    """GRPO with the decoupled correction: −w_behav·min(ρA, clip(ρ)A), ρ = π_θ/π_prox, in value
    and gradient (the trainer passes w_behav as ctx.is_weights and π_prox as old_logprobs)."""
    algo = manager.get("algorithm", "grpo")(manager.get("algorithm", "grpo").Config(
        beta=0.0, epsilon_low=0.1, epsilon_high=0.3, loss_agg="token_mean"))
    logp = torch.tensor([[-0.6, -2.0, -0.5], [-1.0, -1.2, 0.0]], requires_grad=True)
    prox = LOGP
    w, _ = ops.behavior_weights(prox, BEHAV, MASK, "decoupled", cap=5.0)
    batch = TrainBatch({"completion_mask": MASK, "advantages": torch.tensor([1.0, -2.0])}, {"tokens": 5.0, "seqs": 2.0})
    loss, m = algo.loss(logp, batch, StepContext(step=1, old_logprobs=prox, is_weights=w))
    # ρ = π_θ/π_prox: row 0 e^0.4 = 1.4918 with A = 1 is above 1 + 0.3: clipped (1.3, no gradient), then 1, 1;
    # row 1 e^0.5 = 1.6487 with A = −2: ρA = −3.30 < −2.6, unclipped; e^−0.2 = 0.8187 with A = −2: 0.9·−2 =
    # −1.8 < −1.64, clipped (and its behaviour weight is 0: masked)
    r = torch.exp(logp.detach() - prox)
    terms = torch.tensor([[1.3 * 1, r[0, 1] * 1, r[0, 2] * 1], [r[1, 0] * -2, 0.9 * -2, 0.0]])
    want = -(w * terms * MASK).sum() / 5
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    # d/dlogp of −w·ρ·A/5 on the unclipped tokens; the clipped ones get none, whatever their weight
    unclipped = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    grad = -(w * r * torch.tensor([[1.0], [-2.0]]) * unclipped) / 5
    assert torch.allclose(logp.grad, grad, atol=1e-6)
    assert w[0, 0] > 1 and logp.grad[0, 0] == 0.0 and logp.grad[0, 1] != 0.0
    assert m["clip_frac"] == pytest.approx(2 / 5)


# -- cispo --------------------------------------------------------------------------------------------

def test_cispo_loss_and_gradient_by_hand():
    algo = CISPO(CISPOConfig(epsilon_low=0.5, epsilon_high=0.2))  # weights clipped to [0.5, 1.2]
    logp = LOGP.clone().requires_grad_(True)
    adv = torch.tensor([2.0, -1.0])
    batch = TrainBatch({"completion_mask": MASK, "advantages": adv}, {"tokens": 5.0, "seqs": 2.0})
    loss, m = algo.loss(logp, batch, StepContext(step=1, sampler_logprobs=BEHAV))
    # ρ row 0: 1.6487 → 1.2, 0.3679 → 0.5, 1 → 1; row 1: 0.6065 → 0.6065, 7.389 → 1.2
    wt = torch.tensor([[1.2, 0.5, 1.0], [math.exp(-0.5), 1.2, 0.0]])
    want = -((wt[0] * 2.0 * LOGP[0]).sum() + (wt[1, :2] * -1.0 * LOGP[1, :2]).sum()) / 5
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    # every token keeps a gradient, the clipped ones included (PPO's min/clip would zero 1.6487 with A > 0)
    assert torch.allclose(logp.grad, -(wt * adv.unsqueeze(-1) * MASK) / 5, atol=1e-7)
    assert (logp.grad[MASK.bool()] != 0).all()
    assert m["clip_frac"] == pytest.approx(3 / 5)
    # per-token advantages [n, C] (PPO-style) are used as they are
    from rlbench.plugins.algorithms.cispo import cispo_surrogate
    adv2 = torch.tensor([[1.0, -1.0, 2.0], [0.5, 3.0, 0.0]])
    per, _ = cispo_surrogate(LOGP, BEHAV, adv2, 0.5, 0.2)
    assert torch.allclose(per * MASK, -wt * adv2 * LOGP * MASK)
    # without behaviour logprobs the old ones are the behaviour policy; with neither the weight is 1
    loss2, _ = algo.loss(LOGP, batch, StepContext(step=1))
    assert loss2.item() == pytest.approx((-(2.0 * LOGP[0]).sum() - (-1.0 * LOGP[1, :2]).sum()).item() / 5, rel=1e-6)


# -- asynchronous rollouts ------------------------------------------------------------------------------

ASYNC = ("train.steps=5", "train.lr=3e-3", "model.tiny_init_std=0.3", "rollout.max_tokens=3",
         "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.off_policy_steps=1", "eval.kl=false",
         "train.checkpoint_every=1", "train.keep_checkpoints=10")


class Recorder:
    """The completions each step trained on, as the trainer's hook sees them."""

    def __init__(self):
        self.ids, self.logprobs = {}, {}

    @rlbench.hookimpl
    def rlbench_on_rollouts(self, step, rollouts, rewards, run_dir, config):
        self.ids[step] = rollouts.completion_ids.clone()
        self.logprobs[step] = rollouts.sampler_logprobs.clone()


def _async_run(path, *over):
    rec = Recorder()
    with manager.registered(rec):
        tr = start(tiny_config(*ASYNC, *over, task={"name": "first_char"}), path)
        tr.run()
        tr.close()
    return rec


def _regenerate(cfg, s, weights_module, step):
    """Batch ``step`` sampled again, independently of the run: a fresh engine on the given
    weights, torch seeded as the worker seeds it."""
    sampler = Sampler(s, Version(0, weights_module), CostMeter(), EngineSpec.of(cfg), cfg.rollout, cfg.eval.max_tokens)
    torch.manual_seed(batch_seed(cfg.run.seed, step))
    ro = sampler.sample(step).sampled
    return ro.completion_ids, ro.sampler_logprobs


def test_a_lag_of_one_trains_step_t_on_samples_of_the_weights_after_step_t_minus_2(tmp_path, first_char_task):
    from test_faults import _comparable
    run = tmp_path / "a"
    rec = _async_run(run)
    lines = rundir.read_jsonl(run / "metrics.jsonl")
    assert [m["offpolicy/lag"] for m in lines] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert all(m["offpolicy/behavior_kl"] >= 0 for m in lines) and lines[-1]["offpolicy/behavior_kl"] > 0
    # every version the engine served was checked, on the first batch generated from it (batch 2 reuses version 0)
    assert [("sync/probe_drift" in m) for m in lines] == [True, False, True, True, True]
    assert all(m["sync/probe_drift"] < 1e-4 for m in lines if "sync/probe_drift" in m)
    cfg = tiny_config(*ASYNC, task={"name": "first_char"})
    s = setup.build(cfg)  # the initial weights (version 0), built as the run built them

    def version(v):
        if v == 0:
            return s.weights.policy
        m = setup.build(cfg).weights.policy
        m.load_state_dict(load_file(str(run / "checkpoints" / f"step_{v:06d}" / "model.safetensors")), strict=False)
        return m
    for t in (2, 3, 4, 5):
        v = behavior_version(t, 1)
        assert v == max(0, t - 2)
        ids, logprobs = _regenerate(cfg, s, version(v), t)
        # the tokens bit-exact; their logprobs to float rounding (the worker thread's kernels may split work differently)
        gap = (logprobs - rec.logprobs[t]).abs().max().item()
        assert torch.equal(ids, rec.ids[t]) and gap < 1e-5, (t, gap)
    # and not from the weights a synchronous run would have used (the test can tell them apart)
    _, logprobs = _regenerate(cfg, s, version(4), 5)
    assert (logprobs - rec.logprobs[5]).abs().max().item() > 1e-3
    # two seeded runs give identical metrics
    _async_run(tmp_path / "b")
    assert _comparable(rundir.read_jsonl(tmp_path / "b" / "metrics.jsonl")) == _comparable(lines)
    # the overlap: batch t + 1 is being generated before the update of batch t ends
    tl = rundir.read_jsonl(run / "timeline.jsonl")
    gen = {e["step"]: e for e in tl if e["phase"] == "generate"}
    upd = {e["step"]: e for e in tl if e["phase"] == "update"}
    assert sorted(gen) == sorted(upd) == [1, 2, 3, 4, 5]
    for t in range(1, 5):
        assert gen[t + 1]["start"] < upd[t]["end"], (t, gen[t + 1], upd[t])
        assert gen[t + 1]["version"] == max(0, t - 1)


def test_a_push_that_does_nothing_stops_the_run_within_one_step(tmp_path, first_char_task, monkeypatch):
    from test_faults import _steps
    pushes = []

    def broken(self, model):  # the engine was built on version 0; every push does nothing
        pushes.append(1)
    monkeypatch.setattr(HFEngine, "sync", broken)
    # 4 groups of 8: step 1 surely has an informative group, so its update changes the weights
    cfg = tiny_config(*ASYNC, "train.steps=6", "rollout.prompts_per_step=4", "rollout.group_size=8",
                      task={"name": "first_char"})
    run = tmp_path / "r"
    tr = start(cfg, run)
    with pytest.raises(TrainingError, match="rollout weights are stale") as err:
        tr.run()
    assert "step 3" in str(err.value)
    tr.close()
    steps = _steps(run)
    # version 1 (after step 1) is applied before batch 3: the stop comes at step 3, nothing of it was trained
    assert steps == [1, 2] and pushes
    ck = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ck == ["step_000001", "step_000002"]
    resumed = Trainer(cfg, run, resume=True)  # the checkpoints are intact
    assert resumed.step_done == 2
    resumed.close()


@pytest.mark.slow  # 45 s; the synchronous SIGKILL test (test_faults.py) runs in the default suite
def test_sigkill_and_resume_of_an_asynchronous_run_matches_an_uninterrupted_one(tmp_path):
    from test_faults import KILL_RUN, _comparable, _launch, _steps, _write_config
    raw = {**KILL_RUN, "rollout": {**KILL_RUN["rollout"], "off_policy_steps": 1},
           "train": {**KILL_RUN["train"], "steps": 6}, "eval": {**KILL_RUN["eval"], "every": 0}}
    cfg = _write_config(tmp_path / "run.yaml", raw)
    ref = _launch([str(cfg), "--out", str(tmp_path / "ref")], tmp_path / "ref.log")
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    run_dir = tmp_path / "killed" / "k"
    rng = random.Random(11)
    proc = _launch([str(cfg), "--out", str(tmp_path / "killed")], tmp_path / "killed.log")
    kills = 0
    while kills < 1:  # mid-step, at a random point after a step was logged
        seen = len(_steps(run_dir))
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and len(_steps(run_dir)) <= seen:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = _launch(["--resume", str(run_dir)], tmp_path / "killed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    assert kills == 1
    assert _steps(run_dir) == list(range(1, 7))
    a, b = rundir.read_jsonl(tmp_path / "ref" / "k" / "metrics.jsonl"), rundir.read_jsonl(run_dir / "metrics.jsonl")
    assert _comparable(b) == _comparable(a)
    assert [m["offpolicy/lag"] for m in b] == [0.0] + [1.0] * 5


def test_unsupported_asynchronous_setups_are_refused(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(TrainingError, match="offline algorithm 'dpo'"):
        start(tiny_config("rollout.off_policy_steps=1", algorithm={"name": "dpo", "pairs_file": str(pairs)}),
              tmp_path / "dpo")
    with pytest.raises(TrainingError, match="lora_dropout"):
        start(tiny_config("rollout.off_policy_steps=2", "model.lora_rank=4", "model.lora_dropout=0.1"), tmp_path / "lora")
    with pytest.raises(config.ConfigError, match="off_policy_steps must be >= 0"):
        tiny_config("rollout.off_policy_steps=-1")
    with pytest.raises(config.ConfigError, match="is_correction must be one of"):
        tiny_config("rollout.is_correction=clip")
    assert tiny_config("rollout.is_correction=true").rollout.is_correction == "truncate"
