"""Rollout throughput: the same prompts and sampling through the hf and vllm engines.

Prints useful (non-padding) generated tokens per second for each engine, the
ratio, and the time of one weight sync into vLLM. Both engines run in this one
process on the same model weights; each is warmed up once before timing.

    python benchmarks/rollout.py                       # embedded SmolLM2-135M, 8 prompts x 8 samples
    python benchmarks/rollout.py --model PATH --prompts 16 --samples 4 --max-tokens 128
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="alias, local path or hub id")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt (group size)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per engine (median reported)")
    args = ap.parse_args()

    from rlbench.modeling import models
    from rlbench.plugins.engines.hf import HFConfig, HFEngine
    from rlbench.plugins.engines.vllm import VLLMConfig, VLLMEngine
    from rlbench.tasks.arithmetic import Arithmetic, ArithmeticConfig
    from rlbench.types import Sampling

    torch.manual_seed(0)
    model, tok = models.load(args.model)
    prompts = Arithmetic(ArithmeticConfig(max_operand=19), tok).prompts("train", args.prompts, seed=0)
    sampling = Sampling(temperature=args.temperature, max_tokens=args.max_tokens)
    engines = {"hf": HFEngine(HFConfig(batch_size=args.prompts * args.samples), model, tok, "cpu"),
               "vllm": VLLMEngine(VLLMConfig(), model, tok, "cpu")}
    rates = {}
    for name, eng in engines.items():
        eng.generate(prompts, args.samples, sampling)  # warm-up
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = eng.generate(prompts, args.samples, sampling)
            dt = time.perf_counter() - t
            runs.append(r.completion_mask.sum().item() / dt)
        rates[name] = statistics.median(runs)
        print(f"{name:>5}: {rates[name]:7.1f} useful tokens/s  (median of {args.repeats}; "
              f"{args.prompts} prompts x {args.samples} samples, <= {args.max_tokens} tokens, T={args.temperature})")
    print(f"ratio vllm/hf: {rates['vllm'] / rates['hf']:.2f}x")
    syncs = []
    for _ in range(3):
        t = time.perf_counter()
        engines["vllm"].sync(model)
        syncs.append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"vllm weight sync: {statistics.median(syncs):.3f} s for {n_params:.0f}M parameters (median of 3)")
    engines["vllm"].close()


if __name__ == "__main__":
    main()
