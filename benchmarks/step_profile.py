"""Where a training step's time goes: per-phase seconds for one configuration, and the training
phase's achieved FLOP/s against a matrix-multiply peak measured in the same run.

Runs ``--steps`` steps of CONFIG (default configs/quickstart.yaml: the embedded model, 8 prompts
× 8 samples; held-out evaluation off) in this process and prints the median over the steps after
the first (warm-up) of rollout / reward / reference / train / sync seconds. The training phase
does 6·N FLOPs per trained token (forward + backward, Kaplan et al.), N the parameter count;
with ``train.share_prompt_forward`` the prompt tokens of a group are computed once, so the
useful work is counted as if they were not (the figure is the effective rate).

``--baseline SECTION.KEY=VALUE`` runs the same steps a second time with that override (e.g.
``train.share_prompt_forward=false``) and prints the ratio of each phase: the change in one run.

    python benchmarks/step_profile.py
    python benchmarks/step_profile.py --baseline train.share_prompt_forward=false
    python benchmarks/step_profile.py --config configs/smoke.yaml --steps 3 --set engine.name=hf
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

PHASES = ["rollout", "reward", "reference", "train", "sync"]


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n float32 matrix multiply on this machine (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def profile(config: str, sets: list[str], steps: int) -> dict:
    from _steps import run_steps

    run = run_steps(config, sets, steps)
    timed = run.metrics[1:] or run.metrics
    out = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in timed) for p in PHASES + ["optimizer"]}
    out["step"] = sum(out[p] for p in PHASES)
    trained = statistics.median(r.get("tokens/trained", 0.0) for r in timed)  # prompt + completion tokens
    out["train_flops"] = 6 * run.params * trained / max(out["train"], 1e-9)
    out["engine"] = run.engine
    out["params"] = run.params
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=int, default=4, help="steps per configuration (the first is warm-up)")
    ap.add_argument("--baseline", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="also run with these overrides and print the ratios")
    args = ap.parse_args()

    peak = matmul_peak()
    print(f"matmul peak (2048x2048 float32, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    runs = {"profiled": profile(args.config, args.set, args.steps)}
    if args.baseline:
        runs["baseline"] = profile(args.config, args.set + args.baseline, args.steps)
    for name, r in runs.items():
        label = name if name == "profiled" else f"baseline ({' '.join(args.baseline)})"
        print(f"\n{label}: engine {r['engine']}, {r['params'] / 1e6:.0f}M parameters; median seconds per step")
        for p in PHASES + ["step"]:
            print(f"  {p:<10} {r[p]:8.2f}")
            if p == "train":
                print(f"    of which clip + optimizer step {r['optimizer']:6.2f}")
        print(f"  training phase: {r['train_flops'] / 1e9:.1f} GFLOP/s effective = "
              f"{100 * r['train_flops'] / peak:.0f}% of the matmul peak")
    if args.baseline:
        a, b = runs["profiled"], runs["baseline"]
        print("\nratio profiled / baseline per phase: " + ", ".join(
            f"{p} {a[p] / b[p]:.2f}" for p in PHASES + ["step"] if b[p] > 0))


if __name__ == "__main__":
    main()
