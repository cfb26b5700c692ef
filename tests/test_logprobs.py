"""Shared prompt forward: the same logprobs and gradients as running every row in full, with
each distinct prompt embedded once."""
import pytest
import torch

from rlbench.modeling import logprobs as lp
from rlbench.modeling import models


def _batch(tok, P=7, C=5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (6, P + C), generator=g)  # [6, L]
    am = torch.ones(6, P + C, dtype=torch.long)  # [6, L]
    ids[1:3, :P] = ids[0, :P]  # rows 0-2 share a prompt
    ids[4:6, :P] = ids[3, :P]  # rows 3-5 share a shorter, left-padded one
    ids[3:, :2] = tok.pad_token_id
    am[3:, :2] = 0
    am[1, P + 3:] = 0  # short completions
    am[4, P + 1:] = 0
    return ids, am


def _by_hand(model, ids, am, C):
    """Logprobs from the model's own full forward: logits at every position, log_softmax, gather."""
    logits = model(input_ids=ids, attention_mask=am, position_ids=lp.position_ids(am)).logits  # [N, L, V]
    logp = torch.log_softmax(logits[:, -C - 1:-1].float(), -1)  # [N, C, V]
    return logp.gather(-1, ids[:, -C:].unsqueeze(-1)).squeeze(-1)  # [N, C]


@pytest.mark.parametrize("C", [5, 1])
def test_logprobs_and_gradients_match_the_plain_forward(tokenizer, C):
    """Shared prompts (each distinct prompt embedded once) and the LM head on real positions only
    give the logprobs and gradients of the model's own forward over every row and position."""
    model = models.tiny_random(tokenizer, seed=0, init_std=0.3)
    ids, am = _batch(tokenizer, C=C)
    cm = am[:, -C:].float()
    weights = torch.linspace(0.5, 1.5, 6)[:, None]
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    results = []
    for how in ("by hand", False, True):
        seen.clear()
        model.zero_grad()
        logp = _by_hand(model, ids, am, C) if how == "by hand" else lp.token_logprobs(model, ids, am, C, share_prompts=how)[0]
        (logp * cm * weights).sum().backward()
        results.append((logp.detach() * cm, torch.cat([p.grad.flatten() for p in model.parameters()]), sum(seen)))
    hook.remove()
    (a, ga, na), (b, gb, nb), (c, gc, nc) = results
    for x, g in ((b, gb), (c, gc)):
        assert (a - x).abs().max().item() < 1e-5
        assert (ga - g).abs().max().item() <= 1e-5 * ga.abs().max().item()
    assert na == nb == 6 * (7 + C) and nc == 2 * 7 + 6 * (C - 1)  # tokens embedded: 2 prompts once each
    assert (b[cm == 0] == 0).all()  # padding positions are 0


def test_no_sharing_under_gradient_checkpointing(tokenizer):
    model = models.tiny_random(tokenizer, seed=0)
    model.gradient_checkpointing_enable()
    model.train()
    assert not lp._can_share(model)
    model.eval()
    assert lp._can_share(model)
