"""A value model for critic-based algorithms (PPO): the policy's backbone plus a scalar head.

Initialised from a causal LM's transformer body (the LM head is not used):
by default a copy of the policy, so it starts with the policy's features, or
another model that shares the policy's tokenizer (a smaller critic). V for
completion token t is read at the position that predicts token t, aligned
with the logprobs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from rlbench.modeling.logprobs import position_ids


class ValueModel(nn.Module):
    def __init__(self, model: nn.Module, copy_body: bool = True):
        super().__init__()
        self.backbone = copy.deepcopy(model.base_model) if copy_body else model.base_model
        hidden = model.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state  # [N, L, H]
        return self.head(h[:, -(C + 1):-1, :]).squeeze(-1).float()  # [N, C]
