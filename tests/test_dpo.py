"""Online DPO: pair selection, the sigmoid and IPO losses and margins by hand, learning."""
import math

import pytest
import torch

from rlbench import rundir
from rlbench.plugins.algorithms.dpo import DPO, DPOConfig, preference_pairs
from rlbench.training.trainer import start
from rlbench.training.accumulate import MicroBatching, accumulate_gradients
from rlbench.types import StepContext, TrainBatch

from conftest import tiny_config


def test_pairs_are_best_and_worst_of_each_group_and_ties_are_skipped():
    rows, skipped = preference_pairs(torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.2, 0.0, 0.9]), 3)
    assert rows.tolist() == [1, 0, 8, 7] and skipped == 1


def _two_pairs():
    # one-token completions: sequence logprob = token logprob
    logp = torch.tensor([[-1.0], [-2.0], [-3.0], [-1.0]], requires_grad=True)  # c0, r0, c1, r1
    ref = torch.tensor([[-1.5], [-1.5], [-2.0], [-2.0]])
    t = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "attention_mask": torch.ones(4, 2, dtype=torch.long),
         "completion_mask": torch.ones(4, 1)}
    return logp, TrainBatch(t, {"seqs": 4.0, "tokens": 4.0, "pairs": 2.0}), StepContext(step=1, ref_logprobs=ref)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_sigmoid_loss_and_margin_by_hand():
    # pair 0: (−1 + 1.5) − (−2 + 1.5) = 1.0 → h = 0.1;  pair 1: (−3 + 2) − (−1 + 2) = −2 → h = −0.2
    logp, batch, ctx = _two_pairs()
    loss, m = DPO(DPOConfig(beta=0.1)).loss(logp, batch, ctx)
    # −log σ(0.1) = 0.644397, −log σ(−0.2) = 0.798139
    assert loss.item() == pytest.approx((0.644397 + 0.798139) / 2, abs=1e-5)
    assert m["dpo/reward_margin"] == pytest.approx((0.1 - 0.2) / 2)
    assert m["dpo/pair_accuracy"] == 0.5
    loss.backward()
    # d(−log σ(h))/dℓ_c = −β σ(−h) / P
    assert logp.grad[0, 0].item() == pytest.approx(-0.1 * sig(-0.1) / 2)
    assert logp.grad[1, 0].item() == pytest.approx(0.1 * sig(-0.1) / 2)


def test_ipo_loss_by_hand():
    logp, batch, ctx = _two_pairs()
    loss, _ = DPO(DPOConfig(beta=0.1, loss_type="ipo")).loss(logp, batch, ctx)
    # (h/β − 1/(2β))²: (1 − 5)² = 16 and (−2 − 5)² = 49
    assert loss.item() == pytest.approx((16 + 49) / 2)


def test_pairs_stay_together_under_micro_batching(tokenizer):
    from rlbench.modeling import models

    logp, batch, ctx = _two_pairs()
    g = torch.Generator().manual_seed(0)
    batch.tensors["input_ids"] = torch.randint(10, 1000, (4, 6), generator=g)
    batch.tensors["attention_mask"] = torch.ones(4, 6, dtype=torch.long)
    batch.tensors["completion_mask"] = torch.ones(4, 1)
    algo = DPO(DPOConfig())
    losses = []
    for micro in (4, 3, 2):  # 3 is rounded down to 2 so a pair is never split
        model = models.tiny_random(tokenizer, seed=0)
        losses.append(accumulate_gradients(model, algo, batch, ctx, MicroBatching(micro, pairs=True))["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_online_dpo_learns_a_trivial_reward(tmp_path, first_char_task):
    cfg = tiny_config("train.steps=30", "train.lr=3e-3", "model.tiny_init_std=0.3", "rollout.max_tokens=2",
                      "rollout.prompts_per_step=4", "rollout.group_size=8", "train.min_lr_ratio=1.0", "eval.kl=false",
                      algorithm={"name": "dpo"}, task={"name": "first_char"})
    start(cfg, tmp_path / "dpo").run()
    lines = rundir.read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in lines]
    assert sum(rewards[:3]) / 3 < 0.7
    assert max(sum(rewards[i:i + 3]) / 3 for i in range(len(rewards) - 2)) >= 0.9, rewards
    assert all("dpo/pairs" in r for r in lines)
    assert all("dpo/reward_margin" in r for r in lines if r["dpo/pairs"] > 0)  # no pairs (all rewards equal): no update


# -- offline DPO from a JSONL file of pairs -----------------------------------------------------------------

import json  # noqa: E402

from rlbench.plugins.algorithms.dpo import load_pairs  # noqa: E402
from rlbench.types import DataError  # noqa: E402

WORDS = ["sure", "yes", "okay", "fine", "maybe", "right", "good", "well"]


def _pairs_file(path, n=8):
    with open(path, "w") as f:
        for i in range(n):
            w = WORDS[i % len(WORDS)]
            f.write(json.dumps({"prompt": f"Reply to message {i}.", "chosen": f"{w} thing",
                                "rejected": f"{w.capitalize()} thing"}) + "\n")
    return path


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p", "chosen": "a"', "line 2: not valid JSON"),
    ('{"prompt": "p", "chosen": "a"}', "line 2: missing rejected"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "line 2: prompt must be a string"),
    ('{"prompt": "p", "chosen": "", "rejected": "b"}', "line 2: chosen must be a non-empty string"),
    ('[1, 2]', "line 2: expected an object"),
])
def test_pairs_file_errors_name_the_line(tmp_path, line, message):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_pairs(p)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no preference pairs"):
        load_pairs(tmp_path / "empty.jsonl")


def test_missing_pairs_file_is_a_config_error(tmp_path, capsys):
    from rlbench import cli

    cfg = tmp_path / "c.yaml"
    import yaml
    from conftest import TINY
    cfg.write_text(yaml.safe_dump({**TINY, "algorithm": {"name": "dpo", "pairs_file": str(tmp_path / "nope.jsonl")}}))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "runs")]) == 2
    assert "pairs_file not found" in capsys.readouterr().err


def test_offline_rollouts_layout(tmp_path, tokenizer):
    algo = DPO(DPOConfig(pairs_file=str(_pairs_file(tmp_path / "p.jsonl", n=3))))
    assert DPO.needs(algo.config).offline
    seen = []
    for step in (1, 2, 3):  # 2 pairs per step over 3 pairs: the second pass is reshuffled
        ro, rewards = algo.offline_rollouts(step, 2, tokenizer, max_tokens=8)
        assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0] and ro.group.tolist() == [0, 0, 1, 1]
        assert ro.sampler_logprobs is None and "<|im_start|>assistant" in ro.prompts[0].text
        seen += [p.id for p in ro.prompts]
        chosen = tokenizer(ro.texts[0], add_special_tokens=False)["input_ids"]
        assert ro.completion_ids[0, :len(chosen) + 1].tolist() == chosen + [tokenizer.eos_token_id]
        assert ro.texts[1] == ro.texts[0][0].upper() + ro.texts[0][1:]
    assert sorted(seen[:3]) == ["line1", "line2", "line3"] and sorted(seen[3:6]) == ["line1", "line2", "line3"]
    ro, _ = algo.offline_rollouts(1, 1, tokenizer, max_tokens=1)  # "x thing" + end: cut to one token
    assert ro.completion_mask.sum().item() == 2 and ro.finish_reasons == ["length", "length"]


def test_offline_dpo_learns_the_preferred_completions(tmp_path, first_char_task):
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    cfg = tiny_config("train.steps=12", "train.lr=3e-3", "model.tiny_init_std=0.3", "rollout.prompts_per_step=4",
                      "train.min_lr_ratio=1.0", "eval.kl=false",
                      algorithm={"name": "dpo", "pairs_file": str(pairs)}, task={"name": "first_char"})
    start(cfg, tmp_path / "off").run()
    lines = rundir.read_jsonl(tmp_path / "off" / "metrics.jsonl")
    assert all(m["dpo/pairs"] == 4 and "reward/mean" not in m and "sync/logprob_drift" not in m for m in lines)
    # pair accuracy / margin are measured before each update, on pairs seen only in earlier passes
    assert lines[0]["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-4)  # policy = reference at the start
    assert all(m["dpo/pair_accuracy"] == 1.0 for m in lines[-4:])
    assert lines[-1]["dpo/reward_margin"] > 0.5, [m["dpo/reward_margin"] for m in lines]
