"""LoRA / QLoRA through peft, and the merged weights the rollout engine needs.

The policy is trained as a peft LoRA model (adapters on the attention and MLP projections by
default); only the adapters are in the optimizer. The rollout engine serves plain weights: at
every sync ``MergedView.state_dict()`` hands it W + (α/r)·B·A for each adapted projection under
the base model's names (computed, the live model untouched), every other tensor as it is. The
stale-weight check then compares the engine's logprobs with the adapted policy's, so a wrong
merge stops the run. The reference stays the frozen copy made before the adapters (or its
bitsandbytes quantisation, ``model.reference_quantization``).

Not covered: checkpoints hold the peft model's state dict (adapters and base), so ``rlbench
export`` of a LoRA run writes the peft layout, not merged weights; DoRA and other peft variants.
"""
from __future__ import annotations

import copy

import torch


def apply(model, rank: int, alpha: float, dropout: float, targets: list[str]):
    """The model with LoRA adapters (B = 0: the same function as before); base weights frozen."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg)


def _base_name(name: str) -> str:
    """peft parameter name → the plain model's (``base_model.model.x.base_layer.weight`` → ``x.weight``)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """Plain weights of a LoRA model: adapted projections merged, adapter tensors dropped."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight"):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = _base_name(name + ".base_layer.weight")
                    deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter)
    out = {}
    for name, tensor in peft_model.state_dict().items():
        if "lora_" in name:
            continue
        key = _base_name(name)
        out[key] = tensor + deltas[key].to(tensor.dtype) if key in deltas else tensor
    return out


class MergedView:
    """What the engine syncs from: ``state_dict()`` gives merged plain weights; everything else
    (``generate``, ``eval``, …) is the live peft model, so the hf engine samples from it."""

    def __init__(self, peft_model):
        self._model = peft_model

    def state_dict(self):
        return merged_state_dict(self._model)

    def __getattr__(self, name):
        return getattr(self._model, name)


def merged_copy(peft_model):
    """A plain model with the adapters merged (for building an engine from the current policy)."""
    return copy.deepcopy(peft_model).merge_and_unload()
