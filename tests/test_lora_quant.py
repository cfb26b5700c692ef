"""LoRA adapters (peft) and a bitsandbytes-quantised reference, on tiny-random with the hf engine.
The vLLM merged-weight sync is in test_engine_vllm.py."""
import json

import pytest
import torch

from rlbench import rundir
from rlbench.training.trainer import start

from conftest import tiny_config


def _bnb_reason() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes does not import here: {e}"
    return None


@pytest.mark.parametrize("mode, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantised_reference_with_its_error_measured(tmp_path, mode, layer, first_char_task):
    reason = _bnb_reason()
    if reason:
        pytest.skip(reason)
    cfg = tiny_config("train.steps=2", "model.tiny_init_std=0.3", "algorithm.beta=0.1", "eval.after=true",
                      f"model.reference_quantization={mode}", task={"name": "first_char"})
    tr = start(cfg, tmp_path / "r")
    assert type(tr.reference.model.layers[0].self_attn.q_proj).__name__ == layer
    assert all(not p.requires_grad for p in tr.reference.parameters())
    tr.run()
    q = json.loads((tmp_path / "r" / "manifest.json").read_text())["reference_quantization"]
    assert q["mode"] == mode and q["tokens"] > 0 and q["completions"] == 8
    assert 0 < q["mean_abs_logprob_error"] <= q["max_abs_logprob_error"]
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all(m["kl/ref_quant_error"] == q["mean_abs_logprob_error"] for m in metrics)
    assert all(torch.isfinite(torch.tensor(m["kl"])) for m in metrics)
    assert rundir.read_jsonl(tmp_path / "r" / "eval.jsonl")[-1]["ref_quant_error"] == q["mean_abs_logprob_error"]


def test_lora_trains_adapters_only_and_merges_exactly(tmp_path, first_char_task):
    pytest.importorskip("peft")
    from rlbench.modeling import lora

    cfg = tiny_config("train.steps=3", "model.tiny_init_std=0.3", "train.lr=1e-2", "model.lora_rank=4",
                      task={"name": "first_char"})
    tr = start(cfg, tmp_path / "r")
    base = {k: v.clone() for k, v in tr.reference.state_dict().items()}
    trainable = [n for n, p in tr.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    tr.run()
    merged = lora.merged_state_dict(tr.policy)
    plain = lora.merged_copy(tr.policy).state_dict()
    assert set(merged) == set(plain) == set(base)  # the plain model's names
    assert all(torch.allclose(merged[k], plain[k], atol=1e-6) for k in plain)
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 1e-4  # the adapters moved
    unmerged = {lora._base_name(k): v for k, v in tr.policy.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(unmerged[k], base[k]) for k in base)  # base weights frozen
    metrics = rundir.read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all(m["sync/logprob_drift"] < 1e-4 for m in metrics)
