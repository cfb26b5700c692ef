"""``rlbench export``: a checkpoint → a plain Hugging Face model directory.

The directory holds safetensors weights, config, tokenizer (with its chat
template) and a generation config whose EOS includes the chat end token, so
``AutoModelForCausalLM.from_pretrained`` and ``vllm.LLM`` load it directly.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from rlbench import config as cfgmod
from rlbench.modeling import models


class ExportError(Exception):
    pass


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "state.json").exists())
    if step is not None:
        ckpts = [p for p in ckpts if p.name == f"step_{step:06d}"]
    if not ckpts:
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        raise FileNotFoundError(f"no checkpoint {'for step %d ' % step if step is not None else ''}under "
                                f"{run_dir / 'checkpoints'} (have: {', '.join(have) or 'none'})")
    cfg = cfgmod.load(cfg_path)
    model, tok = models.load(cfg.model.name, seed=cfg.run.seed, dtype=torch.float32,
                             tiny_layers=cfg.model.tiny_layers, tiny_hidden=cfg.model.tiny_hidden,
                             tiny_init_std=cfg.model.tiny_init_std)
    missing, unexpected = model.load_state_dict(load_file(str(ckpts[-1] / "model.safetensors")), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ExportError(f"checkpoint does not match the model: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = models.stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
