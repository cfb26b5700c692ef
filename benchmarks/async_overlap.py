"""What asynchronous rollouts buy: the same steps at ``rollout.off_policy_steps`` k = 0 and k = 1,
in one invocation.

For each k it runs ``--steps`` steps of CONFIG (default configs/quickstart.yaml: the embedded
model, 8 prompts × 8 samples, evaluation off) and prints, as medians over the steps after the
first two (warm-up; at k = 1 the first step waits for a whole generation):
  * seconds per step (wall, as the trainer sees it);
  * generation seconds per batch (rollout + reward, as the worker measured them at k = 1);
  * the share of generation hidden behind training at k = 1: 1 − waited / generation, where
    waited is the time the trainer spent waiting for its batch (``time/rollout_wait``);
  * the ratio of seconds per step, k = 1 over k = 0 (below 1: faster).
On a CPU the worker and the trainer compete for the same cores, so the ratio can be near 1 even
when most of the generation is hidden; on a GPU with a separate inference engine it is the
largest speed lever left.

    python benchmarks/async_overlap.py
    python benchmarks/async_overlap.py --config configs/smoke.yaml --steps 6 --set engine.name=hf
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def measure(config: str, sets: list[str], steps: int, k: int) -> dict:
    from _steps import run_steps

    run = run_steps(config, [*sets, f"rollout.off_policy_steps={k}"], steps)
    warm = min(2, steps - 1)
    timed, seconds = run.metrics[warm:], run.seconds[warm:]
    gen = statistics.median(r.get("time/rollout", 0.0) + r.get("time/reward", 0.0) for r in timed)
    waited = statistics.median(r.get("time/rollout_wait", r.get("time/rollout", 0.0) + r.get("time/reward", 0.0))
                               for r in timed)
    return {"step": statistics.median(seconds), "generation": gen, "waited": waited,
            "train": statistics.median(r.get("time/train", 0.0) for r in timed), "engine": run.engine,
            "lag": [r.get("offpolicy/lag", 0.0) for r in run.metrics]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=int, default=5, help="steps per setting (the first two are warm-up)")
    args = ap.parse_args()
    sync = measure(args.config, args.set, args.steps, 0)
    lag1 = measure(args.config, args.set, args.steps, 1)
    print(f"config {args.config}  engine {sync['engine']}  steps {args.steps} (medians after 2 warm-up steps)")
    print(f"{'':8} {'s/step':>8} {'generate':>9} {'waited':>8} {'train':>8}")
    for name, r in (("k = 0", sync), ("k = 1", lag1)):
        print(f"{name:8} {r['step']:8.2f} {r['generation']:9.2f} {r['waited']:8.2f} {r['train']:8.2f}")
    hidden = 1 - lag1["waited"] / lag1["generation"] if lag1["generation"] > 0 else float("nan")
    print(f"generation hidden behind training at k = 1: {hidden:.0%}")
    print(f"ratio s/step k = 1 / k = 0: {lag1['step'] / sync['step']:.2f}")
    print(f"lag per step at k = 1: {lag1['lag']}")


if __name__ == "__main__":
    main()
