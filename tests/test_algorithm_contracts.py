"""What each algorithm promises besides its loss value: the config values it accepts and refuses,
what it asks the trainer for (Needs), its adaptive-β state, and the metrics and batch layout its
prepare() and loss() return, checked by hand on small tensors with asymmetric settings."""
import json
import math

import pytest
import torch

from rlbench import manager, ops
from rlbench.plugins.algorithms.dapo import overlong_penalty
from rlbench.plugins.algorithms.dpo import DPO, DPOConfig, dpo_loss, load_pairs, preference_pairs
from rlbench.plugins.algorithms.gspo import sequence_surrogate
from rlbench.plugins.algorithms.ppo import PPO, PPOConfig, clipped_value_loss
from rlbench.plugins.algorithms.reinforce_pp import ReinforcePP, ReinforcePPConfig
from rlbench.types import DataError, Prompt, Rollouts, StepContext, TrainBatch

FAMILY = ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"]


def _config(name, **kw):
    cls = manager.get("algorithm", name)
    return cls, cls.Config(**kw)


# -- config values --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("field,ok,bad", [
    ("beta", 0.0, -0.01), ("kl_target", 0.0, -1e-3), ("epsilon_low", 0.0, -0.1), ("epsilon_high", 0.0, -0.1),
    ("epochs", 1, 0), ("mini_batches", 1, 0), ("loss_agg", "token_mean", "mean"),
])
def test_family_configs_accept_the_boundary_and_refuse_past_it(name, field, ok, bad):
    cls, _ = _config(name)
    cls.Config(**{field: ok}).validate()
    with pytest.raises(ValueError) as e:
        cls.Config(**{field: bad}).validate()
    assert str(e.value) == {
        "loss_agg": "loss_agg must be one of seq_mean, token_mean, constant_length; got 'mean'",
        "epochs": "epochs and mini_batches must be >= 1", "mini_batches": "epochs and mini_batches must be >= 1",
    }.get(field, "beta, kl_target and epsilons must be >= 0")


@pytest.mark.parametrize("kw,ok", [
    ({"gamma": 0.0, "lam": 1.0}, True), ({"gamma": 1.0, "lam": 0.0}, True), ({"gamma": 1.01}, False),
    ({"gamma": -0.1}, False), ({"lam": 1.5}, False), ({"lam": -0.5}, False), ({"epochs": 0}, False),
    ({"mini_batches": 0}, False), ({"beta": -0.1}, False), ({"beta": 0.0, "epochs": 1, "mini_batches": 1}, True),
])
def test_ppo_config_ranges(kw, ok):
    if ok:
        PPOConfig(**kw).validate()
        return
    with pytest.raises(ValueError) as e:
        PPOConfig(**kw).validate()
    assert str(e.value) in ("gamma and lam must be in [0, 1]", "epochs and mini_batches must be >= 1 and beta >= 0")


@pytest.mark.parametrize("kw,ok", [
    ({"overlong_buffer_frac": 0.0, "overlong_penalty": 0.0, "dynamic_sampling": 0}, True),
    ({"overlong_buffer_frac": 1.0}, True), ({"overlong_buffer_frac": 1.01}, False), ({"overlong_buffer_frac": -0.1}, False),
    ({"overlong_penalty": -0.5}, False), ({"dynamic_sampling": -1}, False), ({"beta": -1.0}, False),
])
def test_dapo_config_ranges(kw, ok):
    cls, _ = _config("dapo")
    if ok:
        cls.Config(**kw).validate()
        return
    with pytest.raises(ValueError) as e:
        cls.Config(**kw).validate()
    assert str(e.value) in ("overlong_buffer_frac must be in [0, 1], overlong_penalty and dynamic_sampling >= 0",
                            "beta, kl_target and epsilons must be >= 0")


def test_dpo_config(tmp_path):
    DPOConfig(loss_type="ipo", beta=1e-3).validate()
    for kw, msg in [({"loss_type": "hinge"}, "loss_type must be 'sigmoid' or 'ipo', got 'hinge'"),
                    ({"beta": 0.0}, "beta must be > 0"),
                    ({"pairs_file": str(tmp_path / "none.jsonl")}, f"pairs_file not found: {tmp_path / 'none.jsonl'}")]:
        with pytest.raises(ValueError) as e:
            DPOConfig(**kw).validate()
        assert str(e.value) == msg


# -- what each algorithm asks the trainer for --------------------------------------------------------

@pytest.mark.parametrize("name,group", [("grpo", 2), ("dr_grpo", 2), ("dapo", 2), ("gspo", 2), ("rloo", 2),
                                        ("reinforce_pp", 1), ("ppo", 1)])
@pytest.mark.parametrize("beta,kl_target,epochs,mini,ref,old", [
    (0.0, 0.0, 1, 1, False, False), (0.1, 0.0, 1, 1, True, False), (0.0, 0.01, 1, 1, True, False),
    (0.0, 0.0, 2, 1, False, True), (0.0, 0.0, 1, 2, False, True), (0.5, 0.0, 3, 4, True, True),
])
def test_needs_follow_the_config(name, group, beta, kl_target, epochs, mini, ref, old):
    cls, cfg = _config(name, beta=beta, kl_target=kl_target, epochs=epochs, mini_batches=mini)
    n = cls.needs(cfg)
    want_ref = ref if name != "reinforce_pp" else beta > 0  # REINFORCE++'s KL sits in the reward: β alone decides
    assert (n.reference, n.old_logprobs, n.epochs, n.mini_batches, n.group_size) == (want_ref, old, epochs, mini, group)
    assert n.critic == (name == "ppo") and n.dynamic_sampling == (4 if name == "dapo" else 0)
    assert not n.pairs and not n.offline


def test_needs_of_ppo_dapo_and_dpo_specifics(tmp_path):
    n = PPO.needs(PPOConfig(critic_lr=3e-4, critic_model="tiny-random"))
    assert n.critic and n.critic_lr == 3e-4 and n.critic_model == "tiny-random"
    cls, cfg = _config("dapo", dynamic_sampling=7)
    assert cls.needs(cfg).dynamic_sampling == 7
    n = DPO.needs(DPOConfig())
    assert (n.reference, n.group_size, n.pairs, n.offline) == (True, 2, True, False)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert DPO.needs(DPOConfig(pairs_file=str(pairs))).offline


# -- adaptive β and its checkpointed state ------------------------------------------------------------

@pytest.mark.parametrize("name,key", [("grpo", "kl_coef"), ("rloo", "kl_coef"), ("ppo", "kl_coef")])
def test_after_step_moves_beta_toward_the_kl_target_and_state_round_trips(name, key):
    cls, cfg = _config(name, beta=0.1, kl_target=0.01, kl_horizon=4.0)
    algo = cls(cfg)
    assert algo.after_step({"kl": 0.011}) == {key: pytest.approx(0.1 * (1 + 0.1 / 4))}
    assert algo.after_step({}) == {key: pytest.approx(0.1 * (1 + 0.1 / 4))}  # no KL logged: β stays
    assert algo.after_step({"kl": float("nan")})[key] == pytest.approx(0.1 * (1 + 0.1 / 4))
    state = algo.state_dict()
    assert state == {"beta": pytest.approx(0.1025)}
    fresh = cls(cfg)
    fresh.load_state_dict(state)
    assert fresh.kl_ctl.beta == algo.kl_ctl.beta and fresh.after_step({"kl": 0.0})[key] == pytest.approx(0.1025 * 0.95)


# -- prepare and loss, by hand -----------------------------------------------------------------------

def _rollouts(lengths, group_size, C, logprobs=None):
    N = len(lengths)
    mask = (torch.arange(C) < torch.tensor(lengths).unsqueeze(-1)).float()
    B = N // group_size
    return Rollouts(prompts=[Prompt(id=f"p{b}", text="", answer=None) for b in range(B)],
                    prompt_ids=[[5, 6 + b] for b in range(B)], group=torch.arange(B).repeat_interleave(group_size),
                    completion_ids=(mask * 9).long(), completion_mask=mask,
                    sampler_logprobs=(logprobs if logprobs is not None else -mask), texts=[""] * N, finish_reasons=["stop"] * N)


def test_family_loss_terms_and_metrics_with_asymmetric_weights():
    from rlbench.plugins.algorithms.grpo import GRPO, GRPOConfig

    logp = torch.zeros(1, 2, requires_grad=True)
    t = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "completion_mask": torch.ones(1, 2), "advantages": torch.tensor([1.0])}
    batch = TrainBatch(t, {"seqs": 1.0, "tokens": 2.0})
    loss, m = GRPO(GRPOConfig(beta=0.0, loss_agg="token_mean")).loss(
        logp, batch, StepContext(step=1, is_weights=torch.tensor([[3.0, 0.5]])))
    assert loss.item() == pytest.approx(-(3.0 + 0.5) / 2) and set(m) == {"clip_frac"}  # β = 0: no KL term, no metric
    _, m = GRPO(GRPOConfig(beta=0.0)).loss(logp, batch, StepContext(step=1, ref_logprobs=torch.zeros(1, 2)))
    assert "pg/kl_term" not in m  # β = 0 with a reference (eval.kl computes one): still no KL term
    # β > 0 without reference logprobs: the KL term is left out, not an error
    loss, m = GRPO(GRPOConfig(beta=0.5, loss_agg="token_mean")).loss(logp, batch, StepContext(step=1))
    assert loss.item() == pytest.approx(-1.0) and "pg/kl_term" not in m
    # the KL metric is aggregated like the loss: constant_length divides by seqs × max_tokens
    ref = torch.tensor([[math.log(2.0), 0.0]])  # k3 per token: (2 − ln2 − 1), 0
    loss, m = GRPO(GRPOConfig(beta=0.5, loss_agg="constant_length")).loss(
        logp, batch, StepContext(step=1, ref_logprobs=ref, max_tokens=4))
    k = 2 - math.log(2.0) - 1
    assert m["pg/kl_term"] == pytest.approx(k / 4) and loss.item() == pytest.approx((-2 + 0.5 * k) / 4)


def test_group_advantage_defaults_and_prepare_metrics():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv, _ = ops.group_advantages(r, 4)  # defaults: std scaling, eps 1e-4
    assert adv.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert ops.group_advantages(torch.tensor([3.0, 1.0]), 1)[0].tolist() == [0.0, 0.0]  # G = 1: no group signal
    cls, cfg = _config("grpo", std_eps=0.5)
    batch = cls(cfg).prepare(_rollouts([2, 2, 1, 3], 4, 3), r, StepContext(step=1))
    assert batch["advantages"].tolist() == pytest.approx([0.75 / 1.0, -0.25, -0.25, -0.25])  # std 0.5 + eps 0.5
    assert batch.metrics == pytest.approx({"pg/zero_std_frac": 0.0, "pg/zero_std_groups": 0.0,
                                           "pg/adv_abs_mean": 1.5 / 4})


def test_ppo_prepare_and_loss_by_hand():
    # one completion of 2 tokens; sampler logprobs −1, old (μ > 1) −0.5, reference −1.5; reward 1; values 0.2, 0.4
    ro = _rollouts([2], 1, 3, logprobs=torch.tensor([[-1.0, -1.0, 0.0]]))
    ctx = StepContext(step=1, old_logprobs=torch.tensor([[-0.5, -0.5, 0.0]]), ref_logprobs=torch.tensor([[-1.5, -1.5, 0.0]]),
                      values=torch.tensor([[0.2, 0.4, 9.0]]))
    algo = PPO(PPOConfig(beta=0.1, gamma=1.0, lam=1.0, whiten_advantages=False))
    batch = algo.prepare(ro, torch.tensor([1.0]), ctx)
    # k1 against the old policy: 1.0 per token → rewards −0.1, −0.1 + 1; returns 0.8, 0.9; A = R − V: 0.6, 0.5
    assert batch["returns"][0].tolist() == pytest.approx([0.8, 0.9, 0.0])
    assert batch["advantages"][0].tolist() == pytest.approx([0.6, 0.5, 0.0])
    assert batch["old_values"][0].tolist() == pytest.approx([0.2, 0.4, 0.0])  # padding masked
    assert batch.metrics == pytest.approx({"ppo/value_mean": 0.3, "ppo/return_mean": 0.85})
    # no reference (β = 0 needs none): no KL in the reward, and no error
    b0 = PPO(PPOConfig(beta=0.0, lam=1.0, whiten_advantages=False)).prepare(ro, torch.tensor([1.0]),
                                                                             StepContext(step=1, values=ctx.values))
    assert b0["returns"][0].tolist() == pytest.approx([1.0, 1.0, 0.0])
    # without old logprobs the sampler's are π_old: k1 = 0.5 per token
    b2 = algo.prepare(ro, torch.tensor([1.0]), StepContext(step=1, ref_logprobs=ctx.ref_logprobs, values=ctx.values))
    assert b2["returns"][0].tolist() == pytest.approx([0.9, 0.95, 0.0])
    # loss: ratio exp(logp − old); ε 0.2; value clip 0.1 around the old values; vf_coef 0.5; IS weights 2, 0.5
    algo = PPO(PPOConfig(epsilon=0.2, value_clip=0.1, vf_coef=0.5))
    logp = torch.tensor([[-0.5 + math.log(1.5), -0.5, 0.0]], requires_grad=True)  # ratios 1.5 (clipped to 1.2), 1.0
    v = torch.tensor([[0.5, 0.35, 0.0]], requires_grad=True)  # 0.5 is 0.3 past V_old 0.2 → clipped to 0.3
    lctx = StepContext(step=1, old_logprobs=ctx.old_logprobs, values=v, is_weights=torch.tensor([[2.0, 0.5, 0.0]]))
    loss, m = algo.loss(logp, batch, lctx)
    pg = [-1.2 * 0.6 * 2.0, -1.0 * 0.5 * 0.5]
    vl = [0.5 * max((0.5 - 0.8) ** 2, (0.3 - 0.8) ** 2), 0.5 * max((0.35 - 0.9) ** 2, (0.35 - 0.9) ** 2)]
    assert loss.item() == pytest.approx((pg[0] + pg[1] + 0.5 * (vl[0] + vl[1])) / 2, rel=1e-5)
    assert m == pytest.approx({"clip_frac": 0.5, "ppo/value_loss": (vl[0] + vl[1]) / 2, "ppo/value_clip_frac": 0.5})
    loss.backward()
    assert v.grad[0, 0].item() == 0.0 and v.grad[0, 1].item() == pytest.approx(0.5 * (0.35 - 0.9) / 2)  # clipped: no grad
    # two completions of different lengths, no old logprobs (μ = 1: ratio 1): a token mean, not a sequence mean
    two = TrainBatch({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
                      "completion_mask": torch.tensor([[1.0, 1, 1], [1, 0, 0]]), "advantages": torch.tensor([[1.0, 1, 1], [4, 0, 0]]),
                      "returns": torch.zeros(2, 3), "old_values": torch.zeros(2, 3)}, {"seqs": 2.0, "tokens": 4.0})
    loss, _ = PPO(PPOConfig(vf_coef=0.0)).loss(torch.zeros(2, 3, requires_grad=True), two,
                                               StepContext(step=1, values=torch.zeros(2, 3)))
    assert loss.item() == pytest.approx(-(1 + 1 + 1 + 4) / 4)


def test_clipped_value_loss_is_symmetric_around_the_old_value():
    loss, clipped = clipped_value_loss(torch.tensor([0.1, 0.9]), torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]), 0.2)
    # V moved −0.4 / +0.4 from V_old: clipped to 0.3 / 0.7, whose errors (0.3) exceed the unclipped ones (0.1)
    assert loss.tolist() == pytest.approx([0.5 * 0.09, 0.5 * 0.09]) and clipped.tolist() == [1.0, 1.0]


def test_reinforce_pp_prepare_by_hand():
    ro = _rollouts([2, 1], 1, 2, logprobs=torch.tensor([[-1.0, -2.0], [-1.0, 0.0]]))
    ref = torch.tensor([[-1.5, -1.0], [-3.0, 0.0]])
    algo = ReinforcePP(ReinforcePPConfig(beta=0.5))
    batch = algo.prepare(ro, torch.tensor([1.0, 0.0]), StepContext(step=1, ref_logprobs=ref))
    # k1 = sampler − ref: 0.5, −1.0 | 2.0; token rewards −0.25, 0.5 + 1 | −1.0; returns 1.25, 1.5 | −1.0
    returns = torch.tensor([1.25, 1.5, -1.0])
    want = (returns - returns.mean()) / torch.sqrt(((returns - returns.mean()) ** 2).mean() + 1e-8)
    assert batch["advantages"][batch["completion_mask"].bool()].tolist() == pytest.approx(want.tolist(), abs=1e-5)
    assert batch.metrics["reinforce_pp/kl_reward"] == pytest.approx((-0.25 + 0.5 - 1.0) / 2)
    old = torch.tensor([[-1.0, -1.0], [-3.0, 0.0]])  # with old logprobs they are π_old: k1 0.5, 0.0 | 0.0
    b2 = algo.prepare(ro, torch.tensor([1.0, 0.0]), StepContext(step=1, ref_logprobs=ref, old_logprobs=old))
    assert b2.metrics["reinforce_pp/kl_reward"] == pytest.approx(-0.25 / 2)
    b3 = ReinforcePP(ReinforcePPConfig(beta=0.0)).prepare(ro, torch.tensor([1.0, 0.0]), StepContext(step=1))
    assert b3.metrics["reinforce_pp/kl_reward"] == 0.0  # no reference: no KL in the reward, and no error


def test_gspo_sequence_ratio_with_padding_and_asymmetric_clip():
    logp = torch.tensor([[math.log(1.2), math.log(1.2), 0.0], [math.log(0.5), 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    loss, clipped = sequence_surrogate(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, 0.1, 0.15)
    # s0 = 1.2 (geometric mean over its 2 real tokens; padding ignored) → clipped to 1.15 for A > 0
    # s1 = 0.5 → for A < 0 the clip at 0.9 gives the larger loss: −min(−0.5, −0.9) = 0.9
    assert loss.tolist() == pytest.approx([-1.15, 0.9]) and clipped.tolist() == [1.0, 1.0]
    loss, clipped = sequence_surrogate(logp, torch.zeros(2, 3), torch.tensor([-1.0, 1.0]), mask, 0.1, 0.15)
    assert loss.tolist() == pytest.approx([1.2, -0.5]) and clipped.tolist() == [0.0, 0.0]
    # a non-zero old policy: the ratio is π_θ/π_old, and inside the clip range nothing counts as clipped
    old = torch.full((2, 3), -0.5)
    loss, clipped = sequence_surrogate(logp + old, old, torch.tensor([1.0, 1.0]), mask, 0.1, 0.25)
    assert loss.tolist() == pytest.approx([-1.2, -0.5]) and clipped.tolist() == [0.0, 0.0]  # s 1.2 and 0.5, A > 0
    inside = torch.tensor([[math.log(1.05), math.log(1.05), 0.0]])
    _, clipped = sequence_surrogate(inside, torch.zeros(1, 3), torch.tensor([1.0]), mask[:1], 0.1, 0.15)
    assert clipped.tolist() == [0.0]
    cls, cfg = _config("gspo", epsilon_low=0.1, epsilon_high=0.15, beta=0.0, loss_agg="seq_mean")
    batch = TrainBatch({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
                        "completion_mask": mask, "advantages": torch.tensor([1.0, -1.0])}, {"seqs": 2.0, "tokens": 3.0})
    total, m = cls(cfg).loss(logp.clone().requires_grad_(True), batch, StepContext(step=1, old_logprobs=torch.zeros(2, 3)))
    assert total.item() == pytest.approx((-1.15 + 0.9) / 2) and m["clip_frac"] == pytest.approx(1.0)


def test_dapo_overlong_penalty_edges_and_prepare():
    assert overlong_penalty(torch.tensor([3, 4]), 4, 0.5, 2.0).tolist() == pytest.approx([0.0, -2.0])  # buffer 0.5
    assert overlong_penalty(torch.tensor([12]), 10, 4, 1.0).tolist() == [-1.0]  # past L_max: capped at −penalty
    out = overlong_penalty(torch.tensor([2, 3]), 10, 0, 1.0)
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 0.0]
    cls, cfg = _config("dapo", overlong_buffer_frac=0.5, overlong_penalty=1.0)
    batch = cls(cfg).prepare(_rollouts([4, 3, 2, 1], 4, 4), torch.zeros(4), StepContext(step=1, max_tokens=4))
    # L_cache 2 of 4: penalties −1, −0.5, 0, 0 on all-zero task rewards
    assert batch.metrics["dapo/overlong_penalty_mean"] == pytest.approx(-0.375)
    assert batch.metrics["dapo/overlong_frac"] == 0.5 and batch["advantages"][0] < batch["advantages"][3]


def test_rloo_baseline_over_the_group_axis():
    from rlbench.plugins.algorithms.rloo import leave_one_out_advantages

    adv, _ = leave_one_out_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 0.0]), 3)
    assert adv.tolist() == pytest.approx([1 - 1.5, 0 - 2.0, 3 - 0.5, 3 - 0.0, 0 - 1.5, 0 - 1.5])


# -- DPO: pairs, batch layout, loss, offline data ------------------------------------------------------

def test_preference_pairs_take_the_first_best_and_worst_of_ties():
    rows, skipped = preference_pairs(torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5]), 4)
    assert rows.tolist() == [0, 1, 4, 7] and skipped == 0


def test_dpo_prepare_layout_and_metrics():
    ro = _rollouts([2, 1, 2, 2, 1, 1], 2, 2)
    batch = DPO(DPOConfig()).prepare(ro, torch.tensor([0.0, 1.0, 0.5, 0.5, 1.0, 0.0]), StepContext(step=1))
    assert batch["row"].tolist() == [1, 0, 4, 5]  # (chosen, rejected) of groups 0 and 2; group 1 is a tie
    assert batch.totals == {"seqs": 4.0, "tokens": 5.0, "pairs": 2.0}
    assert batch.metrics == {"dpo/pairs": 2.0, "dpo/skipped_groups": 1.0}
    one = DPO(DPOConfig()).prepare(_rollouts([2, 1], 2, 2), torch.tensor([1.0, 1.0]), StepContext(step=1))
    assert one.totals == {"seqs": 0.0, "tokens": 1.0, "pairs": 1.0} and one.metrics["dpo/pairs"] == 0.0  # no pair:
    # the normalisers stay 1, so the (empty) loss is 0, not NaN


def test_dpo_loss_masks_padding_and_counts_ties_as_wrong():
    logp = torch.tensor([[-1.0, 5.0], [-1.0, 7.0]])  # 5 and 7 sit on padding
    ref = torch.tensor([[-1.0, 3.0], [-1.0, -2.0]])
    mask = torch.tensor([[1.0, 0], [1, 0]])
    loss, h = dpo_loss(logp, ref, mask, 0.5, "sigmoid")
    assert h.tolist() == [0.0] and loss.tolist() == pytest.approx([math.log(2.0)])
    t = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
         "completion_mask": mask}
    _, m = DPO(DPOConfig(beta=0.5)).loss(logp, TrainBatch(t, {"seqs": 2.0, "tokens": 2.0, "pairs": 1.0}),
                                         StepContext(step=1, ref_logprobs=ref))
    assert m == {"dpo/reward_margin": 0.0, "dpo/pair_accuracy": 0.0}  # a margin of 0 is not a correct pair
    # the reference differs within the pair: h = β[(ℓ_c − ℓ_ref,c) − (ℓ_r − ℓ_ref,r)] = 0.5·[(−1 + 3) − (−2 + 1)]
    loss, h = dpo_loss(torch.tensor([[-1.0], [-2.0]]), torch.tensor([[-3.0], [-1.0]]), torch.ones(2, 1), 0.5, "ipo")
    assert h.tolist() == pytest.approx([1.5]) and loss.tolist() == pytest.approx([(1.5 / 0.5 - 1 / (2 * 0.5)) ** 2])


def test_load_pairs_errors_and_blank_lines(tmp_path):
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "prompt": "plain"}) + "\n")
    pairs = load_pairs(f)
    assert [p["line"] for p in pairs] == [1, 3] and pairs[1]["prompt"] == "plain"  # a blank line is skipped, not the end
    cases = [({}, "missing prompt, chosen, rejected (has nothing)"),
             ({"prompt": "p", "x": 1}, "missing chosen, rejected (has prompt, x)"),
             ({**good, "prompt": [{"role": "user"}]}, "prompt must be a string or a list of {role, content} messages"),
             ({**good, "prompt": [{"role": "user", "content": 3}]}, "prompt must be a string or a list"),
             ({**good, "prompt": ["hi"]}, "prompt must be a string or a list"),
             ({**good, "chosen": ""}, "chosen must be a non-empty string")]
    for row, msg in cases:
        f.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError) as e:
            load_pairs(f)
        assert str(e.value).startswith(f"{f} line 1: ") and msg in str(e.value), str(e.value)
    f.write_text("é" * 3 + "\n")  # not JSON; read as UTF-8 whatever the locale
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        load_pairs(f)


def test_offline_rollouts_prompts_completions_and_order(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "one"}], "chosen": "yes", "rejected": "no way"},
            {"prompt": "two", "chosen": "sure", "rejected": "nope"}] + \
        [{"prompt": f"more {i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    algo = DPO(DPOConfig(pairs_file=str(f), pairs_seed=5))
    order = [algo._pair_index(k) for k in range(18)]
    assert sorted(order[:6]) == sorted(order[6:12]) == sorted(order[12:]) == list(range(6))  # each pass: the file once
    assert order[:6] != order[6:12]  # reshuffled every pass
    again = DPO(DPOConfig(pairs_file=str(f), pairs_seed=5))
    assert [again._pair_index(k) for k in range(18)] == order  # seeded
    other = [DPO(DPOConfig(pairs_file=str(f), pairs_seed=s))._pair_index(0) for s in range(12)]
    assert len(set(other)) > 2  # the seed changes the order
    chat = tokenizer.apply_chat_template
    by_id = {}
    for step in range(1, 7):
        ro, rewards = algo.offline_rollouts(step, 1, tokenizer, max_tokens=2)
        by_id[ro.prompts[0].id] = ro
        assert rewards.tolist() == [1.0, 0.0] and ro.pad_id == tokenizer.pad_token_id
        assert ro.prompt_ids[0] == tokenizer(ro.prompts[0].text, add_special_tokens=False)["input_ids"]
    r1, r2 = by_id["line1"], by_id["line2"]
    assert r1.prompts[0].text == chat(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert r2.prompts[0].text == chat([{"role": "user", "content": "two"}], tokenize=False, add_generation_prompt=True)
    end = tokenizer.eos_token_id
    yes = tokenizer("yes", add_special_tokens=False)["input_ids"]
    assert r1.completion_ids[0, :len(yes) + 1].tolist()[:2] == (yes + [end])[:2]
    no_way = tokenizer("no way", add_special_tokens=False)["input_ids"] + [end]
    assert r1.finish_reasons == ["stop" if len(yes) + 1 <= 2 else "length", "length" if len(no_way) > 2 else "stop"]
    assert r1.completion_ids.dtype == torch.long and r1.completion_mask.sum(-1).tolist() == [min(2, len(yes) + 1), 2]
    plain = DPO(DPOConfig(pairs_file=str(f), pairs_chat_template=False))
    for step in range(1, 7):
        ro, _ = plain.offline_rollouts(step, 1, tokenizer, max_tokens=8)
        if ro.prompts[0].id == "line2":
            assert ro.prompts[0].text == "two"  # a string prompt is used as it is
            assert ro.finish_reasons == ["stop", "stop"]


class _Tokenizer:
    """The test tokenizer, but one that adds a BOS token unless told not to, with optional
    end and pad ids: what offline DPO must not depend on."""

    def __init__(self, tok, eos=True, pad=True):
        self.tok, self.chat_template = tok, tok.chat_template
        self.eos_token_id = tok.eos_token_id if eos else None
        self.pad_token_id = tok.pad_token_id if pad else None

    def __call__(self, text, add_special_tokens=True):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([4242] if add_special_tokens else []) + ids}

    def apply_chat_template(self, *a, **kw):
        return self.tok.apply_chat_template(*a, **kw)

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def test_offline_rollouts_add_no_special_tokens_and_handle_missing_end_and_pad(tmp_path, tokenizer):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n")
    plain = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no")]
    ro, _ = DPO(DPOConfig(pairs_file=str(f))).offline_rollouts(1, 1, _Tokenizer(tokenizer), max_tokens=8)
    assert ro.prompt_ids[0] == tokenizer(ro.prompts[0].text, add_special_tokens=False)["input_ids"]
    assert ro.completion_ids[0, :len(plain[0]) + 1].tolist() == plain[0] + [tokenizer.eos_token_id]
    ro, _ = DPO(DPOConfig(pairs_file=str(f))).offline_rollouts(1, 1, _Tokenizer(tokenizer, eos=False, pad=False), 8)
    assert ro.pad_id == 0 and ro.completion_mask.sum(-1).tolist() == [len(plain[0]), len(plain[1])]  # no end token
