"""Algorithm ``dpo``: Direct Preference Optimization, online from the shared rollouts or offline from a file.

Online (default): for each prompt group, the completion with the highest reward is *chosen* and
the one with the lowest is *rejected*; a group whose rewards are all equal has
no pair and is skipped (counted in ``dpo/skipped_groups``). With sequence
logprobs ℓ = Σ_t log π(o_t) and the frozen reference's ℓ_ref:

    h = β [(ℓ_c − ℓ_ref,c) − (ℓ_r − ℓ_ref,r)]
    sigmoid (Rafailov et al. 2023):  loss = −log σ(h)
    ipo     (Azar et al. 2023):      loss = (h/β − 1/(2β))²

averaged over pairs. ``dpo/reward_margin`` is the mean implicit reward margin
h and ``dpo/pair_accuracy`` the share of pairs with h > 0.

Rows are laid out [chosen_0, rejected_0, chosen_1, …] and ``Needs(pairs=True)``
tells the trainer to keep that order and never split a pair across micro-batches.

Offline (``pairs_file``): a JSONL file, one pair per line,
``{"prompt": str | [chat messages], "chosen": str, "rejected": str}`` (TRL's
preference format). Each step takes ``rollout.prompts_per_step`` pairs in a
seeded order that reshuffles every pass over the file; string prompts get the
tokenizer's chat template (``pairs_chat_template``), completions get its
end-of-turn token and are cut at ``rollout.max_tokens``. Nothing is sampled
and the task reward is not used; held-out evaluation still runs on the task.
A malformed line stops the run before training with its file and line number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import rlbench
from rlbench.ops import uniform_groups
from rlbench.types import AlgorithmBase, DataError, Needs, Prompt, Rollouts, TrainBatch


@rlbench.hookimpl
def rlbench_algorithms():
    return {"dpo": "rlbench.plugins.algorithms.dpo:DPO"}


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL constraint
    loss_type: str = "sigmoid"  # sigmoid | ipo
    pairs_file: str = ""  # JSONL of {prompt, chosen, rejected}: offline DPO on it ("" = online, from rollouts)
    pairs_chat_template: bool = True  # wrap string prompts in the tokenizer's chat template
    pairs_seed: int = 0  # order of the pairs (reshuffled each pass over the file)

    def validate(self):
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.pairs_file and not Path(self.pairs_file).is_file():
            raise ValueError(f"pairs_file not found: {self.pairs_file}")


def load_pairs(path: str | Path) -> list[dict]:
    """Read and check a JSONL preference file; any bad line is a DataError naming file and line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with prompt, chosen, rejected")
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
            if missing:
                raise DataError(f"{where}: missing {', '.join(missing)} (has {', '.join(sorted(row)) or 'nothing'})")
            p = row["prompt"]
            ok_prompt = isinstance(p, str) or (isinstance(p, list) and p and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p))
            if not ok_prompt:
                raise DataError(f"{where}: prompt must be a string or a list of {{role, content}} messages")
            for k in ("chosen", "rejected"):
                if not isinstance(row[k], str) or not row[k]:
                    raise DataError(f"{where}: {k} must be a non-empty string")
            pairs.append({"prompt": p, "chosen": row["chosen"], "rejected": row["rejected"], "line": no})
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def preference_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Row indices [2P] (chosen, rejected, …) of the best and worst completion per group, and skipped groups."""
    r = rewards.view(-1, group_size)  # [B, G]
    best, worst = r.argmax(-1), r.argmin(-1)  # [B]
    keep = ~uniform_groups(r, group_size)  # [B]
    base = torch.arange(r.shape[0]) * group_size
    rows = torch.stack([base + best, base + worst], -1)[keep].reshape(-1)  # [2P]
    return rows, int((~keep).sum())


def dpo_loss(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, beta: float, loss_type: str):
    """Per-pair loss [P] and margin h [P] from per-token logprobs [2P, C] laid out chosen/rejected."""
    seq = (logp * mask).sum(-1) - (ref * mask).sum(-1)  # [2P] log-ratio to the reference
    h = beta * (seq[0::2] - seq[1::2])  # [P]
    if loss_type == "ipo":
        return (h / beta - 1 / (2 * beta)) ** 2, h
    return -F.logsigmoid(h), h


class DPO(AlgorithmBase):
    Config = DPOConfig

    def __init__(self, config: DPOConfig):
        self.config = config
        self.pairs = load_pairs(config.pairs_file) if config.pairs_file else None
        self._perm: tuple[int, list[int]] | None = None

    @classmethod
    def needs(cls, config: DPOConfig) -> Needs:
        return Needs(reference=True, group_size=2, pairs=True, offline=bool(config.pairs_file))

    def _pair_index(self, k: int) -> int:
        """The k-th pair drawn (0-based, over the whole run): a fresh seeded shuffle per pass."""
        n = len(self.pairs)
        epoch = k // n
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.config.pairs_seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g).tolist())
        return self._perm[1][k % n]

    def offline_rollouts(self, step: int, n: int, tokenizer, max_tokens: int) -> tuple[Rollouts, torch.Tensor]:
        """Step ``step``'s n pairs as rollouts with group size 2 (chosen, rejected) and rewards 1, 0."""
        end = tokenizer.eos_token_id
        prompts, prompt_ids, comps, finish = [], [], [], []
        for k in range((step - 1) * n, step * n):
            pair = self.pairs[self._pair_index(k)]
            p = pair["prompt"]
            if isinstance(p, list):
                text = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            elif self.config.pairs_chat_template and tokenizer.chat_template:
                text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True)
            else:
                text = p
            prompts.append(Prompt(id=f"line{pair['line']}", text=text, answer=None))
            prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            for key in ("chosen", "rejected"):
                ids = tokenizer(pair[key], add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
                finish.append("length" if len(ids) > max_tokens else "stop")
                comps.append(ids[:max_tokens])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in comps]
        group = torch.arange(len(prompts)).repeat_interleave(2).tolist()
        ro = Rollouts.from_token_lists(prompts, prompt_ids, group, comps, texts, finish, pad)
        return ro, torch.tensor([1.0, 0.0]).repeat(len(prompts))  # [2n]

    def prepare(self, rollouts, rewards, ctx) -> TrainBatch:
        rows, skipped = preference_pairs(rewards, rollouts.group_size)
        full = TrainBatch.from_rollouts(rollouts)
        tensors = {k: v[rows] for k, v in full.tensors.items()}  # "row" goes along: the loss gets these rows' ctx
        mask = tensors["completion_mask"]
        batch = TrainBatch(tensors, {"seqs": float(len(rows)), "tokens": float(mask.sum().clamp(min=1)),
                                     "pairs": float(max(1, len(rows) // 2))})
        batch.metrics.update({"dpo/pairs": float(len(rows) // 2), "dpo/skipped_groups": float(skipped)})
        return batch

    def loss(self, logprobs, batch, ctx):
        per_pair, h = dpo_loss(logprobs, ctx.ref_logprobs, batch["completion_mask"], self.config.beta,
                               self.config.loss_type)
        n = batch.totals["pairs"]
        return per_pair.sum() / n, {"dpo/reward_margin": h.sum().item() / n,
                                    "dpo/pair_accuracy": (h > 0).float().sum().item() / n}
