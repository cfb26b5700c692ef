"""The hf rollout engine: shapes, group order, stop tokens, logprob convention."""
import torch

from rlbench.modeling import logprobs, models
from rlbench.plugins.engines.hf import HFConfig, HFEngine
from rlbench.types import Prompt, Sampling


def _prompts(tok, qs):
    return [Prompt(id=q, text=tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                      add_generation_prompt=True), answer=None) for q in qs]


def test_samples_are_group_major_and_logprobs_match_the_trainer(tokenizer):
    torch.manual_seed(0)
    model = models.tiny_random(tokenizer, seed=0, init_std=0.3)
    eng = HFEngine(HFConfig(batch_size=4), model, tokenizer, "cpu")
    # prompts of different lengths exercise left padding; batch_size 4 splits 3 prompts x 3 samples over calls
    r = eng.generate(_prompts(tokenizer, ["Hi", "What is two plus two, exactly?", "Say a long sentence now."]), 3,
                     Sampling(temperature=0.9, top_p=0.95, max_tokens=6))
    assert r.n == 9 and r.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.completion_ids.shape[1] <= 6 and len(r.texts) == 9 and len(r.finish_reasons) == 9
    inputs = r.model_inputs()
    C = r.completion_ids.shape[1]
    lp, _ = logprobs.token_logprobs(model, inputs["input_ids"], inputs["attention_mask"], C, temperature=0.9)
    # logprobs of π_T at the sampling temperature (top-p not applied), so the trainer's recomputation agrees
    assert (lp * r.completion_mask - r.sampler_logprobs).abs().max().item() < 1e-4
    raw, _ = logprobs.token_logprobs(model, inputs["input_ids"], inputs["attention_mask"], C)
    assert (raw * r.completion_mask - r.sampler_logprobs).abs().max().item() > 1e-3  # T = 1 would not agree


def test_stops_at_chat_end_and_reports_finish_reasons():
    model, tok = models.load(models.EMBEDDED)
    eng = HFEngine(HFConfig(), model, tok, "cpu")
    r = eng.generate(_prompts(tok, ["What is 2 + 3? Reply with just the number."]), 2,
                     Sampling(max_tokens=24, greedy=True))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert r.finish_reasons == ["stop", "stop"]
    for row, mask in zip(r.completion_ids, r.completion_mask):
        n = int(mask.sum())
        assert row[n - 1].item() == end  # the stop token is the last real token
        assert (row[n:] == tok.pad_token_id).all()
    assert "5" in r.texts[0] and "<|im_end|>" not in r.texts[0]
    short = eng.generate(_prompts(tok, ["Write a long poem about the sea."]), 1, Sampling(max_tokens=3, greedy=True))
    assert short.finish_reasons == ["length"] and short.completion_mask.sum().item() == 3
