"""Model directories rlbench writes are readable by tools that build a model from its config
(TRL's ``create_model_from_path``, vLLM, ``AutoConfig`` users): ``architectures`` is set."""
import json

import pytest
import torch

from rlbench.modeling import models


def _load_by_config(path):
    """Build the model the way a tool that trusts config.json does: TRL's loader when TRL is
    installed, else transformers' class named by ``architectures``."""
    try:
        from trl.trainer.utils import create_model_from_path
    except ImportError:
        import transformers
        from transformers import AutoConfig

        arch = AutoConfig.from_pretrained(path).architectures[0]
        return getattr(transformers, arch).from_pretrained(path)
    return create_model_from_path(str(path))


def test_embedded_model_converted_into_an_empty_cache_names_its_architecture(tmp_path, monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setenv("RLBENCH_CACHE", str(tmp_path / "cache"))
    d = models.embedded_model_dir()
    assert d.parent == tmp_path / "cache"
    assert json.loads((d / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert AutoConfig.from_pretrained(d).architectures == ["LlamaForCausalLM"]
    model = _load_by_config(d)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M
    # an older rlbench wrote "architectures": null; such a cache is repaired when it is used
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": None}))
    assert models.embedded_model_dir() == d
    assert json.loads((d / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_save_whole_writes_a_directory_loadable_by_its_config(tmp_path, tokenizer):
    """save_whole writes the vLLM engine's copy, the quantised reference's source and the embedded
    conversion: each must name its architecture and reload to the same weights."""
    model = models.tiny_random(tokenizer, seed=3)
    assert model.config.architectures is None  # built from a config, never saved
    models.save_whole(model, tmp_path / "m")
    again = _load_by_config(tmp_path / "m")
    assert type(again) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
