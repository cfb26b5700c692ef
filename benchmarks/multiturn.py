"""What multi-turn rollouts cost beyond generation: a 4-turn environment with a trivial tool, in
one invocation on the embedded model.

It runs the same prompts (``--prompts`` × ``--samples`` trajectories, ``--turns`` turns of at
most ``--tokens`` sampled tokens each, a step environment that answers "ok" at once) and prints:
  * the share of rollout wall time spent outside the engine (rendering token deltas, tokenizing
    observations, the environment, building the trajectory tensors), against generation time;
    the goal is under 10% with a trivial tool;
  * sampled tokens per second of the multi-turn rollout against single-turn generation of the
    same prompts with one turn of ``turns × tokens`` tokens (the same sampled length): the price
    of re-entering the engine each turn (hf re-encodes the whole context every call; vLLM keeps
    its prefix cache).

    python benchmarks/multiturn.py                 # vllm when installed, else hf
    python benchmarks/multiturn.py --engine hf
"""
from __future__ import annotations

import argparse
import dataclasses
import time


class Ok:
    """A step environment that never ends the trajectory early: the turn limit does."""

    def reset(self, **row):
        return None

    def step(self, text):
        return "ok", False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24, help="sampled tokens per turn at most")
    args = ap.parse_args()

    from rlbench import config as cfgmod
    from rlbench.config_env import EnvConfig
    from rlbench.environments.episodes import Episodes
    from rlbench.modeling import models
    from rlbench.training.sampler import EngineSpec
    from rlbench.types import Sampling

    name = cfgmod.auto_engine() if args.engine == "auto" else args.engine
    cfg = cfgmod.resolve({"engine": {"name": name}, "task": {"name": "arithmetic", "max_operand": 19}})
    model, tok = models.load(models.EMBEDDED)
    task = __import__("rlbench.manager", fromlist=["x"]).get("task", "arithmetic")(cfg.task, tok)
    prompts = task.prompts("train", args.prompts, seed=0)
    engine = EngineSpec.of(cfg).build(model, tok, "cpu")
    engine_seconds = [0.0]

    def generate(ps, n, sampling):
        t = time.perf_counter()
        out = engine.generate(ps, n, sampling)
        engine_seconds[0] += time.perf_counter() - t
        return out

    env = dataclasses.replace(EnvConfig(factory="x:y"), max_turns=args.turns, max_context_tokens=4096)
    episodes = Episodes(Ok, env, tok, models.stop_token_ids(tok))
    sampling = Sampling(temperature=1.0, max_tokens=args.tokens)
    episodes.run(generate, prompts[:2], 1, sampling)  # warm-up
    engine_seconds[0] = 0.0
    t = time.perf_counter()
    ro, metrics = episodes.run(generate, prompts, args.samples, sampling)
    wall = time.perf_counter() - t
    sampled = ro.completion_mask.sum().item()
    outside = wall - engine_seconds[0]
    t = time.perf_counter()
    single = engine.generate(prompts, args.samples, dataclasses.replace(sampling, max_tokens=args.turns * args.tokens))
    single_wall = time.perf_counter() - t
    single_tokens = single.completion_mask.sum().item()
    close = getattr(engine, "close", None)
    if close:
        close()
    print(f"engine {name}; {args.prompts} prompts x {args.samples} trajectories, {args.turns} turns of <= {args.tokens} "
          f"tokens (turns taken {metrics['env/turns_mean']:.2f}, template drift {metrics['env/template_drift']:.0f})")
    print(f"multi-turn rollout: {wall:.2f} s, of which engine {engine_seconds[0]:.2f} s; outside the engine "
          f"{outside:.3f} s = {outside / engine_seconds[0]:.1%} of generation time (goal < 10%)")
    print(f"sampled tokens/s: multi-turn {sampled / wall:.1f} ({sampled:.0f} tokens), single-turn of the same length "
          f"{single_tokens / single_wall:.1f} ({single_tokens:.0f} tokens); ratio {sampled / wall / (single_tokens / single_wall):.2f}")


if __name__ == "__main__":
    main()
