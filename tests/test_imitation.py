"""The imitation baselines (sft on the task's references, rft on accepted samples) and the
out-of-distribution held-out splits they are compared on: losses against hand computations on the
tiny model, the empty update, the splits' disjointness and their records in eval.jsonl."""
import json

import pytest
import torch

from conftest import tiny_config, train
from rlbench.config import ConfigError
from rlbench.modeling import models
from rlbench.plugins.algorithms.rft import RFT, RFTConfig, accepted_rows
from rlbench.seeds import data_seed
from rlbench.tasks.arithmetic import REWORDINGS, Arithmetic, ArithmeticConfig
from rlbench.training.sampler import gold_rollouts
from rlbench.types import Prompt, Rollouts, StepContext


def _arith(tokenizer, **kw):
    cfg = ArithmeticConfig(**kw)
    cfg.validate()
    return Arithmetic(cfg, tokenizer)


# -- sft ---------------------------------------------------------------------------------------------

def test_gold_rollouts_are_the_worked_solutions_with_the_end_of_turn_token(tokenizer):
    task = _arith(tokenizer, max_operand=19)
    prompts = task.prompts("train", 3, seed=1)
    ro, missing = gold_rollouts(task, prompts, tokenizer, max_tokens=64)
    assert missing == 0 and ro.n == 3 and ro.group.tolist() == [0, 1, 2] and ro.sampler_logprobs is None
    for i, p in enumerate(prompts):
        n = int(ro.completion_mask[i].sum())
        ids = ro.completion_ids[i, :n].tolist()
        assert ids[-1] == models.stop_token_ids(tokenizer)[-1]
        assert tokenizer.decode(ids[:-1]) == f"<think>{p.id} = {p.answer}</think>\n<answer>{p.answer}</answer>"
    assert task.score(prompts, ro.texts)["accuracy"] == [1.0, 1.0, 1.0]  # the references pass the verifier
    short, _ = gold_rollouts(task, prompts, tokenizer, max_tokens=4)
    assert short.completion_ids.shape[1] == 4 and short.finish_reasons == ["length"] * 3


def test_gold_rollouts_drop_prompts_without_a_reference_and_refuse_a_task_without_any(tokenizer):
    class Partial:
        def gold(self, p):
            return None if p.id == "b" else "<answer>1</answer>"

    ps = [Prompt(id=x, text=f"Q {x}", answer=1) for x in "abc"]
    ro, missing = gold_rollouts(Partial(), ps, tokenizer, 16)
    assert missing == 1 and [p.id for p in ro.prompts] == ["a", "c"]

    class NoGold:
        pass

    with pytest.raises(Exception, match="no reference solutions"):
        gold_rollouts(NoGold(), ps, tokenizer, 16)


def test_sft_loss_is_the_nll_of_the_solution_tokens_only(tmp_path, tokenizer):
    """One step of sft on the tiny model: the logged loss equals −mean log p(solution token) of the
    initial model, computed here on each unpadded prompt + solution, prompt positions excluded."""
    cfg = tiny_config("algorithm.name=sft", "train.steps=1", "rollout.max_tokens=32",
                      task={"name": "arithmetic", "max_operand": 19})
    rows = train(cfg, tmp_path / "run")
    task = _arith(tokenizer, max_operand=19)
    prompts = task.prompts("train", cfg.rollout.prompts_per_step, seed=data_seed(cfg.run.seed, 1, 0))
    model = models.tiny_random(tokenizer, seed=cfg.run.seed).eval()
    end = models.stop_token_ids(tokenizer)[-1]
    total, count, with_prompt = 0.0, 0, 0.0
    for p in prompts:
        prompt = tokenizer(p.text, add_special_tokens=False)["input_ids"]
        sol = tokenizer(task.gold(p), add_special_tokens=False)["input_ids"] + [end]
        ids = torch.tensor([prompt + sol])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # [L-1, V]
        token_lp = lp.gather(-1, ids[0, 1:, None])[:, 0]  # [L-1] log p(token t | < t)
        total -= token_lp[len(prompt) - 1:].sum().item()  # the solution's tokens only
        with_prompt -= token_lp.sum().item()
        count += len(sol)
    assert rows[0]["loss"] == pytest.approx(total / count, rel=1e-4)
    assert rows[0]["sft/nll"] == pytest.approx(total / count, rel=1e-4)
    assert abs(with_prompt / count - total / count) > 1e-2  # the prompt would change it: it is masked
    assert rows[0]["gold/accuracy"] == 1.0 and rows[0]["tokens/generated"] == 0.0


# -- rft ---------------------------------------------------------------------------------------------

def test_accepted_rows_keep_what_the_verifier_accepts():
    r = torch.tensor([0.0, 1.1, 1.0, 0.1, 0.05, 0.0, 1.05, 0.0])  # [B=2, G=4]
    assert accepted_rows(r, 4, 1.0, False).tolist() == [1, 2, 6]
    assert accepted_rows(r, 4, 1.0, True).tolist() == [1, 6]  # the first accepted of each group
    assert accepted_rows(r, 4, 1.1, False).tolist() == [1]
    assert accepted_rows(r, 4, 2.0, True).tolist() == []
    with pytest.raises(ValueError):
        RFTConfig(accept=0.0).validate()


def test_rft_loss_is_the_token_mean_nll_of_the_accepted_completions_only():
    ids = torch.zeros(4, 3, dtype=torch.long)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    ro = Rollouts(prompts=[Prompt("a", "x", 1), Prompt("b", "y", 2)], prompt_ids=[[5, 6], [7]],
                  group=torch.tensor([0, 0, 1, 1]), completion_ids=ids, completion_mask=mask,
                  sampler_logprobs=None, texts=[""] * 4, finish_reasons=["stop"] * 4)
    algo = RFT(RFTConfig())
    batch = algo.prepare(ro, torch.tensor([1.0, 0.0, 1.1, 0.1]), StepContext(step=1))
    assert batch["row"].tolist() == [0, 2] and batch.totals["tokens"] == 3.0
    assert batch.metrics["rft/accepted_frac"] == 0.5 and batch.metrics["rft/prompts_with_accepted"] == 2.0
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]], requires_grad=True)  # rows 0 and 2
    loss, m = algo.loss(lp, batch, StepContext(step=1))
    assert loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    loss.backward()
    assert torch.allclose(lp.grad, -torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]) / 3)  # padding: no gradient


def test_rft_with_nothing_accepted_applies_no_update(tmp_path, tokenizer):
    cfg = tiny_config("algorithm.name=rft", "algorithm.accept=100.0", "train.steps=2", "train.checkpoint_every=2")
    rows = train(cfg, tmp_path / "run")
    assert [r.get("update/empty") for r in rows] == [1.0, 1.0]
    assert all(r["rft/accepted"] == 0.0 for r in rows)
    from safetensors.torch import load_file
    saved = load_file(str(next((tmp_path / "run").rglob("model.safetensors"))))
    initial = models.tiny_random(tokenizer, seed=0).state_dict()
    assert all(torch.equal(saved[k], initial[k]) for k in saved if k in initial)


# -- out-of-distribution splits ----------------------------------------------------------------------

def test_arithmetic_ood_splits_are_disjoint_from_training_and_from_each_other(tokenizer):
    task = _arith(tokenizer, max_operand=19, test_fraction=0.55)
    train_ids = {p.id for p in task.prompts("train", 4000, seed=0)}
    ids = {s: [p.id for p in task.prompts(s, 150, seed=0)] for s in task.splits()}
    assert task.splits() == ["test", "ood_larger_operands", "ood_more_operands", "ood_reworded"]
    for s in ("test", "ood_larger_operands", "ood_more_operands"):
        assert len(set(ids[s])) == len(ids[s]) and not set(ids[s]) & train_ids, s
    assert not set(ids["ood_larger_operands"]) & set(ids["ood_more_operands"])
    assert not (set(ids["ood_larger_operands"]) | set(ids["ood_more_operands"])) & set(ids["test"])
    big = task.prompts("ood_larger_operands", 150, seed=0)
    assert all(20 <= int(x) <= 39 for p in big for x in p.id.split(" + "))
    assert all(len(p.id.split(" + ")) == 3 and p.answer == sum(map(int, p.id.split(" + ")))
               for p in task.prompts("ood_more_operands", 50, seed=0))
    reworded = task.prompts("ood_reworded", 8, seed=0)
    assert ids["ood_reworded"][:8] == ids["test"][:8]  # the held-out problems, asked differently
    assert all(p.meta["question"].startswith(REWORDINGS[i % 4].format(expr=p.id)) for i, p in enumerate(reworded))
    assert task.prompts("ood_more_operands", 20, seed=7) == task.prompts("ood_more_operands", 20, seed=0)


def test_eval_jsonl_carries_every_split(tmp_path):
    cfg = tiny_config("eval.splits=all", "eval.before=true", "train.steps=1")
    train(cfg, tmp_path / "run")
    (rec,) = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert rec["split"] == "test" and set(rec["splits"]) == {"ood_larger_operands", "ood_more_operands", "ood_reworded"}
    for name, r in rec["splits"].items():
        assert r["n"] == 8 and len(r["correct"]) == 8 and 0.0 <= r["accuracy"] <= 1.0
        assert r["accuracy"] == pytest.approx(sum(r["correct"]) / 8)


def test_an_unknown_eval_split_is_refused_before_training(tmp_path):
    cfg = tiny_config("eval.splits=[ood_reword]")
    with pytest.raises(ConfigError, match="did you mean 'ood_reworded'"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- opd ---------------------------------------------------------------------------------------------

def test_opd_loss_is_the_reverse_kl_estimate_and_its_gradient_the_per_token_policy_gradient():
    from rlbench.plugins.algorithms.opd import OPD, OPDConfig

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    lp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -9.0, -9.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -0.5, -1.0], [-1.3, 0.0, 0.0]])
    rollouts = Rollouts(prompts=[Prompt("a", "", 1)], prompt_ids=[[1]], group=torch.tensor([0, 0]),
                        completion_ids=torch.zeros(2, 3, dtype=torch.long), completion_mask=mask,
                        sampler_logprobs=None, texts=["", ""], finish_reasons=["stop", "stop"])
    rewards = torch.tensor([1.0, 0.0])
    batch = OPD(OPDConfig(teacher="x")).prepare(rollouts, rewards, StepContext(step=1))
    assert "advantages" not in batch  # pure distillation computes no reward advantage
    loss, m = OPD(OPDConfig(teacher="x")).loss(lp, batch, StepContext(step=1, teacher_logprobs=teacher))
    d = [0.5, 0.0, -1.0, 1.0]  # log π_student − log π_teacher on the four real tokens
    assert loss.item() == pytest.approx(sum(d) / 4) and m["opd/reverse_kl"] == pytest.approx(sum(d) / 4)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]) / 4)
    # with the task reward: GRPO's advantage (±0.7071 in a group of two) joins with its weight
    lp2 = lp.detach().clone().requires_grad_(True)
    with_reward = OPD(OPDConfig(teacher="x", reward_coef=0.5))
    batch2 = with_reward.prepare(rollouts, rewards, StepContext(step=1))
    loss2, _ = with_reward.loss(lp2, batch2, StepContext(step=1, teacher_logprobs=teacher))
    loss2.backward()
    a = 0.5 / (0.5 ** 0.5 + 1e-4)  # (1 − mean 0.5) / (unbiased std 0.7071 + eps 1e-4)
    assert lp2.grad[0, 0].item() == pytest.approx((0.5 - 0.5 * a) / 4, rel=1e-3)
    assert lp2.grad[1, 0].item() == pytest.approx((1.0 + 0.5 * a) / 4, rel=1e-3)


def test_opd_on_a_tiny_teacher_student_pair(tmp_path, tokenizer):
    """The reverse KL of a tiny student (seed 0) to a tiny teacher (seed 1) on fixed tokens, by hand
    from the two models' logits at T = 0.7; 0 when the teacher is the student."""
    from rlbench.modeling import logprobs as lpmod
    from rlbench.plugins.algorithms.opd import OPD, OPDConfig

    student, teacher = models.tiny_random(tokenizer, seed=0).eval(), models.tiny_random(tokenizer, seed=1).eval()
    prompt, completion = [5, 6, 7], [[8, 9, 10, 11], [12, 13, 0, 0]]
    ro = Rollouts(prompts=[Prompt("a", "", 1)], prompt_ids=[prompt], group=torch.tensor([0, 0]),
                  completion_ids=torch.tensor(completion), completion_mask=torch.tensor([[1.0] * 4, [1, 1, 0, 0]]),
                  sampler_logprobs=None, texts=["", ""], finish_reasons=["stop", "length"])
    inputs = ro.model_inputs()

    def hand(model):  # log π_T of each completion token, from the unpadded sequence
        out = torch.zeros(2, 4)
        for i, c in enumerate(completion):
            n = 4 if i == 0 else 2
            ids = torch.tensor([prompt + c[:n]])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0].double() / 0.7, -1)
            out[i, :n] = torch.tensor([lp[len(prompt) - 1 + t, c[t]].item() for t in range(n)])
        return out

    s_lp, t_lp = hand(student), hand(teacher)
    expected = ((s_lp - t_lp) * ro.completion_mask).sum() / 6
    algo = OPD(OPDConfig(teacher="x"))
    batch = algo.prepare(ro, torch.zeros(2), StepContext(step=1))
    trainer_lp = lpmod.batched_logprobs(student, inputs, 4, 8, temperature=0.7)  # the trainer's pass
    teacher_lp = lpmod.batched_logprobs(teacher, inputs, 4, 8, temperature=0.7)
    assert torch.allclose(teacher_lp * ro.completion_mask, t_lp, atol=1e-5)
    loss, _ = algo.loss(trainer_lp, batch, StepContext(step=1, teacher_logprobs=teacher_lp))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5) and abs(expected.item()) > 0.01
    same, _ = algo.loss(trainer_lp, batch, StepContext(step=1, teacher_logprobs=trainer_lp))
    assert same.item() == 0.0


def test_opd_run_counts_the_teachers_passes_and_refuses_another_tokenizer(tmp_path):
    cfg = tiny_config("algorithm.name=opd", "algorithm.teacher=tiny-random", "train.steps=1")
    rows = train(cfg, tmp_path / "run")  # the teacher is the untrained student: nothing to learn
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-5) and rows[0]["opd/reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    cost = json.loads((tmp_path / "run" / "cost.json").read_text())
    assert cost["tokens_teacher"] == cost["tokens_reference"] > 0 and cost["params_teacher"] == cost["params"]
    c = cost
    assert c["flops_estimate"] == pytest.approx(
        2 * c["params"] * (c["tokens_prompt"] + c["tokens_generated"] + c["tokens_reference"] + c["tokens_old_logprobs"]
                           + c["tokens_teacher"]) + 6 * c["params"] * c["tokens_trained"])
    with pytest.raises(ConfigError, match="teacher"):
        train(tiny_config("algorithm.name=opd", "algorithm.teacher=/nonexistent/model"), tmp_path / "bad")
