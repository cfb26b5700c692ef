"""rlbench/training/accumulate.py against an independent computation: the micro-batches it forms, the
context each micro-batch's loss receives, the metrics it returns (loss, KL, entropy, sampler drift,
importance weights), and its handling of non-finite losses and of DeepSpeed's padding backwards."""
import math

import pytest
import torch

from rlbench.modeling import logprobs as lpmod
from rlbench import ops
from rlbench.modeling import models
from rlbench.training.accumulate import MicroBatching, SamplerGap, accumulate_gradients, mini_batches
from rlbench.types import StepContext, TrainBatch


def _batch(n=6, P=4, C=5, seed=0):
    """Rows whose prompt lengths differ (left padding) and whose completions are ragged."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 500, (n, P + C), generator=g)
    am = torch.ones(n, P + C, dtype=torch.long)
    prompt_len = [4, 2, 3, 4, 2, 1][:n]
    comp_len = [5, 1, 3, 2, 5, 4][:n]
    cm = torch.zeros(n, C)
    for i in range(n):
        am[i, :P - prompt_len[i]] = 0
        cm[i, :comp_len[i]] = 1
    am[:, P:] = cm.long()
    t = {"input_ids": ids, "attention_mask": am, "completion_mask": cm, "row": torch.tensor([5, 0, 1, 2, 3, 4][:n])}
    return TrainBatch(t, {"seqs": float(n), "tokens": float(cm.sum())})


class Spy:
    """A loss of −Σ w·logp / tokens that records what each micro-batch was given."""

    def __init__(self, nan_on_call=()):
        self.calls, self.nan_on_call = [], {nan_on_call} if isinstance(nan_on_call, int) else set(nan_on_call)

    def loss(self, logp, batch, ctx):
        self.calls.append({"rows": batch["row"].tolist(), "C": batch["completion_mask"].shape[1], "ctx": ctx,
                           "logp": logp.detach()})
        mask = batch["completion_mask"]
        loss = -(logp * mask).sum() / batch.totals["tokens"]
        if ctx.is_weights is not None:
            loss = -(logp * ctx.is_weights * mask).sum() / batch.totals["tokens"]
        if len(self.calls) in self.nan_on_call:
            loss = loss * float("nan")
        return loss, {"spy/rows": float(len(batch["row"]))}


def test_micro_batches_by_prompt_length_by_length_and_in_pairs():
    b = _batch()
    # default: a group's rows together, longest prompt first (stable): prompt lengths 4,2,3,4,2,1
    rows = [m["row"].tolist() for m in MicroBatching(2).split(b)]
    assert rows == [[5, 2], [1, 0], [3, 4]]
    # share_prompts off: by whole length (prompt + completion) 9,3,6,6,7,5, longest first
    assert [m["row"].tolist() for m in MicroBatching(4, share_prompts=False).split(b)] == [[5, 3, 1, 2], [4, 0]]
    # pairs: original order, the size rounded down to an even number (3 → 2), never below 2
    assert [m["row"].tolist() for m in MicroBatching(3, pairs=True).split(b)] == [[5, 0], [1, 2], [3, 4]]
    assert [m["row"].tolist() for m in MicroBatching(1, pairs=True).split(b)] == [[5, 0], [1, 2], [3, 4]]
    assert [m["row"].tolist() for m in MicroBatching(5, pairs=True).split(b)] == [[5, 0, 1, 2], [3, 4]]
    assert all(m.totals == b.totals for m in MicroBatching(2).split(b))  # whole-batch normalisers kept


def test_mini_batches_partition_and_keep_pairs():
    b = _batch()
    assert list(mini_batches(b, 1, seed=3)) == [b]  # one mini-batch: the batch itself
    one = _batch(n=1)
    assert [m.size for m in mini_batches(one, 4, seed=3)] == [1]  # a single row is not split
    two = _batch(n=2)
    assert [m.size for m in mini_batches(two, 2, seed=3)] == [1, 1]  # two rows are
    parts = list(mini_batches(b, 3, seed=3))
    assert [p.size for p in parts] == [2, 2, 2]
    assert sorted(r for p in parts for r in p["row"].tolist()) == [0, 1, 2, 3, 4, 5]
    assert [p["row"].tolist() for p in parts] == [p["row"].tolist() for p in mini_batches(b, 3, seed=3)]  # seeded
    assert [p["row"].tolist() for p in parts] != [p["row"].tolist() for p in mini_batches(b, 3, seed=4)]
    pairs = list(mini_batches(b, 2, seed=3, pairs=True))  # (chosen, rejected) = rows (0,1), (2,3), (4,5) of the batch
    flat = [r for p in pairs for r in p["row"].tolist()]
    assert sorted(flat) == [0, 1, 2, 3, 4, 5] and [p.size for p in pairs] == [4, 2]
    assert [p["row"].tolist() for p in pairs] == [p["row"].tolist() for p in mini_batches(b, 2, seed=3, pairs=True)]
    shuffles = {tuple(r for p in mini_batches(b, 2, seed=s, pairs=True) for r in p["row"].tolist()) for s in range(8)}
    assert len(shuffles) > 2  # the pairs' order follows the seed
    adjacent = {(5, 0), (1, 2), (3, 4)}
    assert all((p["row"][i].item(), p["row"][i + 1].item()) in adjacent for p in pairs for i in range(0, p.size, 2))
    assert all(p.totals["seqs"] == p.size and p.totals["tokens"] == p["completion_mask"].sum().item() for p in pairs)


def test_accumulate_gradients_metrics_and_context_by_an_independent_computation(tokenizer):
    b = _batch()
    N, C = 6, 5  # the context is aligned with rollouts rows 0..5; the batch holds them as "row"
    g = torch.Generator().manual_seed(1)
    ref, sampler = -3 + torch.randn(N, C, generator=g), -3 + torch.randn(N, C, generator=g)
    old, values = -3 + torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
    ctx = StepContext(step=2, max_tokens=C, ref_logprobs=ref, old_logprobs=old, values=values)
    model = models.tiny_random(tokenizer, seed=0)
    # the same policy's logprobs and entropies over the whole batch at once, without shared prompts
    with torch.no_grad():
        logp_all, ent_all = lpmod.token_logprobs(model, b["input_ids"], b["attention_mask"], C, with_entropy=True,
                                                 share_prompts=False)
    rows, mask = b["row"], b["completion_mask"]
    by_row = {int(r): i for i, r in enumerate(rows)}
    tokens = mask.sum()
    gap = (logp_all - sampler[rows]) * mask
    weights = torch.exp(gap).clamp(max=1.5) * mask
    spy = Spy()
    calls = []
    m = accumulate_gradients(model, spy, b, ctx, MicroBatching(2, backward=lambda loss: calls.append(loss.item())),
                             [SamplerGap(sampler, ops.Correction("truncate", 1.5))])
    assert [c["rows"] for c in spy.calls] == [[5, 2], [1, 0], [3, 4]] and len(calls) == 3
    for c in spy.calls:  # each micro-batch got its own rows' context, trimmed to its columns
        r = torch.tensor(c["rows"])
        assert torch.equal(c["ctx"].ref_logprobs, ref[r][:, :c["C"]]) and torch.equal(c["ctx"].old_logprobs, old[r][:, :c["C"]])
        assert torch.equal(c["ctx"].values, values[r][:, :c["C"]]) and c["ctx"].step == 2 and c["ctx"].max_tokens == C
        i = [by_row[x] for x in c["rows"]]
        assert torch.allclose(c["ctx"].is_weights, weights[i][:, :c["C"]], atol=1e-5)
        assert torch.allclose(c["logp"], logp_all[i][:, :c["C"]], atol=1e-5)
    want_loss = -(logp_all * weights * mask).sum() / tokens
    assert m["loss"] == pytest.approx(want_loss.item(), rel=1e-5) and m["loss"] == pytest.approx(sum(calls), rel=1e-6)
    assert m["spy/rows"] == 6.0  # algorithm metrics are summed over micro-batches
    assert m["entropy"] == pytest.approx(((ent_all * mask).sum() / tokens).item(), rel=1e-5)
    assert m["kl"] == pytest.approx(((ops.k3_kl(logp_all, ref[rows]) * mask).sum() / tokens).item(), rel=1e-5)
    assert m["sync/logprob_drift"] == pytest.approx(gap.abs().max().item(), rel=1e-5)
    assert m["sync/logprob_drift_mean"] == pytest.approx((gap.abs().sum() / tokens).item(), rel=1e-5)
    assert m["is/weight_mean"] == pytest.approx((weights.sum() / tokens).item(), rel=1e-5)
    assert "nonfinite_loss" not in m
    # without a reference, a sampler or the IS cap, those metrics are absent and the loss unweighted
    spy2 = Spy()
    m2 = accumulate_gradients(model, spy2, b, StepContext(step=2), MicroBatching(6, backward=lambda loss: None))
    assert set(m2) == {"loss", "entropy", "spy/rows"} and all(c["ctx"].is_weights is None for c in spy2.calls)
    assert m2["loss"] == pytest.approx((-(logp_all * mask).sum() / tokens).item(), rel=1e-5)
    # the gradient really accumulates: a real backward over micro-batches of 1 equals one of 6
    grads = []
    for micro in (1, 6):
        model.zero_grad()
        accumulate_gradients(model, Spy(), b, StepContext(step=2), MicroBatching(micro))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_share_prompts_off_orders_micro_batches_by_whole_length(tokenizer):
    spy = Spy()
    accumulate_gradients(models.tiny_random(tokenizer, seed=0), spy, _batch(), StepContext(step=1),
                         MicroBatching(4, share_prompts=False, backward=lambda loss: None))
    assert [c["rows"] for c in spy.calls] == [[5, 3, 1, 2], [4, 0]]
    spy = Spy()
    accumulate_gradients(models.tiny_random(tokenizer, seed=0), spy, _batch(), StepContext(step=1),
                         MicroBatching(3, pairs=True, backward=lambda loss: None))
    assert [c["rows"] for c in spy.calls] == [[5, 0], [1, 2], [3, 4]]


def test_a_batch_without_rows_stands_for_rows_in_order(tokenizer):
    b = _batch()
    del b.tensors["row"]
    spy = Spy()
    accumulate_gradients(models.tiny_random(tokenizer, seed=0), spy, b, StepContext(step=1),
                         MicroBatching(3, backward=lambda loss: None))
    assert sorted(r for c in spy.calls for r in c["rows"]) == [0, 1, 2, 3, 4, 5]


def test_nonfinite_losses_and_padding_backwards(tokenizer):
    b, model = _batch(), models.tiny_random(tokenizer, seed=0)
    # a NaN loss on the 2nd micro-batch: counted, no backward for it, its loss and metrics left out
    calls = []
    spy = Spy(nan_on_call=2)
    m = accumulate_gradients(model, spy, b, StepContext(step=1), MicroBatching(2, backward=lambda loss: calls.append(loss.item())))
    assert m["nonfinite_loss"] == 1.0 and math.isnan(m["nonfinite_value"]) and len(calls) == 2
    assert m["loss"] == pytest.approx(sum(calls)) and m["spy/rows"] == 4.0
    m = accumulate_gradients(model, Spy(nan_on_call=(1, 3)), b, StepContext(step=1), MicroBatching(2, backward=lambda loss: None))
    assert m["nonfinite_loss"] == 2.0  # every bad micro-batch is counted
    # DeepSpeed (pad_to): every micro-batch gets a backward, the NaN one included, then zero-loss
    # repeats of the last one up to pad_to, so every rank makes the same number of backwards
    calls = []
    m = accumulate_gradients(model, Spy(nan_on_call=2), b, StepContext(step=1),
                             MicroBatching(2, pad_to=5, backward=lambda loss: calls.append(loss.item())))
    assert len(calls) == 5 and math.isnan(calls[1]) and calls[3:] == [0.0, 0.0] and calls[0] != 0.0
    assert m["nonfinite_loss"] == 1.0 and m["loss"] == pytest.approx(calls[0] + calls[2])
    spy = Spy()
    calls = []
    accumulate_gradients(model, spy, b, StepContext(step=1),
                         MicroBatching(2, pad_to=4, backward=lambda loss: calls.append(loss.item())))
    assert len(calls) == 4 and calls[3] == 0.0 and spy.calls[3]["rows"] == spy.calls[2]["rows"]  # the last one, again
    calls = []
    accumulate_gradients(model, Spy(), b, StepContext(step=1),
                         MicroBatching(2, pad_to=3, backward=lambda loss: calls.append(loss.item())))
    assert len(calls) == 3 and 0.0 not in calls  # nothing to pad


@pytest.mark.parametrize("correction", [ops.Correction("mask", 1.5, 0.6), ops.Correction("mask", 1.5, 0.6, "sequence"),
                                        ops.Correction("decoupled", 1.2), ops.Correction("truncate", 1.1)])
def test_off_policy_corrections_and_behaviour_kl_by_an_independent_computation(tokenizer, correction):
    b = _batch()
    N, C = 6, 5
    model = models.tiny_random(tokenizer, seed=0)
    with torch.no_grad():
        logp_all, _ = lpmod.token_logprobs(model, b["input_ids"], b["attention_mask"], C, share_prompts=False)
    rows, mask = b["row"], b["completion_mask"]
    by_row = {int(r): i for i, r in enumerate(rows)}
    tokens = mask.sum()
    g = torch.Generator().manual_seed(4)
    sampler, old = torch.zeros(N, C), torch.zeros(N, C)  # rollouts rows; near the policy, so some weights survive
    sampler[rows] = (logp_all + 0.4 * torch.randn(N, C, generator=g)) * mask
    old[rows] = (logp_all + 0.4 * torch.randn(N, C, generator=g)) * mask
    # decoupled: the proximal (old) logprobs against the behaviour ones; otherwise the current ones
    now = old[rows] if correction.mode == "decoupled" else logp_all
    ratio = torch.exp((now - sampler[rows]) * mask)  # [6, 5]
    if correction.level == "sequence":
        ratio = torch.exp(((now - sampler[rows]) * mask).sum(-1, keepdim=True)).expand(-1, C)
    if correction.mode == "truncate":
        want, zeroed = ratio.clamp(max=correction.cap) * mask, torch.zeros_like(mask)
    else:
        low = correction.low if correction.mode == "mask" else 0.0
        keep = ((ratio <= correction.cap) & (ratio >= low)).float() * mask
        want, zeroed = ratio * keep, mask - keep
    spy = Spy()
    m = accumulate_gradients(model, spy, b, StepContext(step=1, old_logprobs=old), MicroBatching(2, backward=lambda loss: None),
                             [SamplerGap(sampler, correction)])
    for c in spy.calls:
        i = [by_row[x] for x in c["rows"]]
        assert torch.allclose(c["ctx"].is_weights, want[i][:, :c["C"]], atol=1e-5)
    assert m["is/weight_mean"] == pytest.approx((want.sum() / tokens).item(), rel=1e-5)
    if correction.mode == "truncate":
        assert "is/masked_frac" not in m
    else:
        assert 0 < zeroed.sum() < tokens  # the case really masks some tokens and keeps others
        assert m["is/masked_frac"] == pytest.approx((zeroed.sum() / tokens).item(), rel=1e-6)
    # k3 of KL(sampler ‖ trainer): e^d − d − 1, d = logπ_θ − logπ_sampler, per real token
    d = (logp_all - sampler[rows]) * mask
    assert m["behavior_kl"] == pytest.approx(((torch.exp(d) - d - 1) * mask).sum().item() / tokens.item(), rel=1e-5)
