"""The cost meter: token counters, phase timers, the generation budget, and cost.json.

Counters are run totals (checkpointed). In a multi-process run each rank's increments of the
shared counters (tokens, prompts, engine faults) are held back and summed over ranks once per
step (``flush``), so every rank holds the global totals; the counters every rank updates alike
(skipped steps, clipped gradients) are added directly.

FLOPs follow Kaplan et al.: 2N per token of a forward pass, 6N per trained token (forward +
backward, every epoch), with the critic's own parameter count for its value pass and its training.
Every pass counts: the rollouts' prompt prefill (each sampled sequence's prompt, as an engine
without prefix sharing would run it) and generated tokens, every dynamic-sampling round included;
the reference, old-logprob and critic passes (prompt + completion); the trained tokens. The count
is nominal: a shared prompt forward (``train.share_prompt_forward``) or an engine's prefix cache
costs less than counted, the same for every algorithm.

Budgets (``train.max_generated_tokens``, ``train.max_flops``, ``train.max_device_seconds``): a
run stops *after* the step at which its total first reaches a budget, so it spends at least the
budget and less than the budget plus one step's cost; the rule is the same for every algorithm.
Device-seconds are the wall seconds of the training phases (rollout, reward, reference, train,
sync; not model loading, not held-out evaluation, which is the same for every algorithm) times
the number of processes (one device each). Prices
come from the table shipped in the package (``rlbench/prices.yaml``) or the YAML file that
``RLBENCH_PRICES`` names.
"""
from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
import yaml

from rlbench import rundir
from rlbench.training import dist

COUNTERS = ("tokens/generated", "tokens/prompt", "tokens/trained", "tokens/reference", "tokens/old_logprobs", "tokens/critic",
            "nonfinite/skipped", "grad/clipped", "prompts/skipped", "prompts/truncated", "engine/retries",
            "engine/restarts", "update/empty", "tokens/teacher")
SHARED = ("tokens/", "prompts/", "engine/")  # counted per rank, summed over ranks by flush()
UNMETERED = ("load", "eval")  # phases outside the device-second budget
BUDGETS = {"max_flops": "flops", "max_device_seconds": "device_seconds", "max_generated_tokens": "tokens"}


def price_table() -> tuple[dict, str]:
    """The price table and where it came from."""
    path = os.environ.get("RLBENCH_PRICES")
    if path:
        return yaml.safe_load(Path(path).read_text()) or {}, path
    text = resources.files("rlbench").joinpath("prices.yaml").read_text()
    return yaml.safe_load(text) or {}, "rlbench/prices.yaml"


class CostMeter:
    def __init__(self, max_generated_tokens: float = 0, max_flops: float = 0, max_device_seconds: float = 0, *,
                 n_params: int = 0, n_critic: int = 0, n_teacher: int = 0, world: int = 1):
        self.max_generated_tokens = max_generated_tokens
        self.limits = {"flops": float(max_flops), "device_seconds": float(max_device_seconds),
                       "tokens": float(max_generated_tokens)}  # 0 = no such budget
        self.n_params, self.n_critic, self.world = n_params, n_critic, world
        self.n_teacher = n_teacher  # a frozen teacher's parameters (opd): its forward passes count
        self.counters: dict[str, float] = {k: 0.0 for k in COUNTERS}
        self.times: dict[str, float] = {}  # run total wall seconds per phase (load, rollout, …, eval)
        self.last: dict[str, float] = {}  # this step's seconds per phase (time/<phase> in metrics)
        self._pending: dict[str, float] = {}  # this rank's increments of the shared counters, not yet summed
        self.flushed: dict[str, float] = {}  # the increments the last ``flush`` added, summed over ranks
        self._wall: float | None = None  # the metered wall seconds, the largest over ranks at the last flush

    # -- time --------------------------------------------------------------------------------
    def start_step(self) -> None:
        self.last = {}

    @contextmanager
    def timed(self, name: str):
        """Add the block's wall time to phase ``name`` (run total and this step's)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(name, time.perf_counter() - t)

    def add_time(self, name: str, seconds: float, *, run: bool = True, step: bool = True) -> None:
        """Add to the run total (``run``) and to this step's figure (``step``) of phase ``name``."""
        if run:
            self.times[name] = self.times.get(name, 0.0) + seconds
        if step:
            self.last[name] = self.last.get(name, 0.0) + seconds

    # -- counters ------------------------------------------------------------------------------
    def count(self, key: str, value: float) -> None:
        """Add to a shared counter (summed over ranks at the next ``flush``)."""
        self._pending[key] = self._pending.get(key, 0.0) + float(value)

    @property
    def pending(self) -> dict[str, float]:
        """This rank's increments of the shared counters since the last ``flush``."""
        return dict(self._pending)

    def flush(self) -> None:
        keys = [k for k in self.counters if k.startswith(SHARED)]  # the same order on every rank
        totals = dist.sum_floats([self._pending.get(k, 0.0) for k in keys])
        for k, v in zip(keys, totals):
            self.counters[k] += v
        self.flushed = dict(zip(keys, totals))
        self._pending = {}
        self._wall = dist.max_floats([self._metered_wall()])[0]  # ranks agree on the device-second budget

    def _metered_wall(self) -> float:
        return sum(v for k, v in self.times.items() if k not in UNMETERED)

    def fault_totals(self) -> dict[str, float]:
        """``<counter>_total`` for the fault counters that are not zero (gradient clips, skipped
        prompts, engine retries/restarts, skipped steps)."""
        return {f"{k}_total": v for k, v in self.counters.items() if not k.startswith("tokens/") and v}

    def spent(self) -> dict[str, float]:
        """What the run has spent so far, on every budget's axis (and training wall seconds)."""
        wall = self._metered_wall() if self._wall is None else self._wall
        return {"flops": self.flops(self.n_params, self.n_critic), "tokens": self.counters["tokens/generated"],
                "device_seconds": wall * self.world, "wall_seconds": wall}

    def budget_spent(self) -> str | None:
        """The budget that is reached (``flops``, ``device_seconds``, ``tokens``), or None. Every
        generated token counts, dynamic-sampling rounds included, so an algorithm cannot buy
        accuracy with unreported generation."""
        spent = self.spent()
        return next((k for k, limit in self.limits.items() if limit > 0 and spent[k] >= limit), None)

    def fraction(self, steps_done: int, steps: int) -> float:
        """How much of the run's budget is spent: of its FLOP budget when it has one, else its
        device-second budget, else its generated-token budget, else its steps."""
        spent = self.spent()
        for k, limit in self.limits.items():
            if limit > 0:
                return spent[k] / limit
        return steps_done / max(1, steps)

    def state_dict(self) -> dict:
        return {"counters": self.counters, "times": self.times}

    def load_state_dict(self, state: dict) -> None:
        self.counters.update(state["counters"])
        self.times = state["times"]
        self._wall = None

    # -- cost.json ------------------------------------------------------------------------------
    def flops(self, n_params: int, n_critic: int) -> float:
        c = self.counters
        return (2 * n_params * (c["tokens/prompt"] + c["tokens/generated"] + c["tokens/reference"]
                                + c["tokens/old_logprobs"])
                + 6 * (n_params + n_critic) * c["tokens/trained"] + 2 * n_critic * c["tokens/critic"]
                + 2 * self.n_teacher * c["tokens/teacher"])

    def cost(self, *, n_params: int, n_critic: int, device: torch.device, steps_done: int) -> dict:
        wall = sum(self.times.values())
        on_gpu = device.type == "cuda"
        hours = wall / 3600
        prices, source = price_table()
        if on_gpu:
            gpu = torch.cuda.get_device_name(0)
            rate = next((v for k, v in (prices.get("gpu_hour") or {}).items() if k.lower() in gpu.lower()), None)
            device_hours, price = hours, (hours * rate if rate is not None else None)
            peak_dev = torch.cuda.max_memory_allocated() / 2**30
        else:
            cores = torch.get_num_threads()
            rate = prices.get("cpu_core_hour") or 0.0
            device_hours, price, peak_dev = hours * cores, hours * cores * rate, None
        c = self.counters
        return {
            "wall_seconds": {k: round(v, 3) for k, v in self.times.items()},
            "wall_seconds_total": round(wall, 3),
            "tokens_generated": c["tokens/generated"],
            "tokens_prompt": c["tokens/prompt"],
            "tokens_trained": c["tokens/trained"],
            "tokens_reference": c["tokens/reference"],
            "tokens_old_logprobs": c["tokens/old_logprobs"],
            "tokens_critic": c["tokens/critic"],
            "tokens_teacher": c["tokens/teacher"],
            "flops_estimate": self.flops(n_params, n_critic),
            "params": n_params,
            "params_critic": n_critic,
            "params_teacher": self.n_teacher,
            "device": str(device),
            "device_hours": device_hours,
            "device_hours_unit": "gpu-hours" if on_gpu else "cpu-core-hours",
            "price_usd": price,
            "price_table": source,
            "peak_host_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_device_memory_gb": peak_dev,
            "steps_done": steps_done,
            "stopped_by": {None: "steps", "tokens": "token_budget", "flops": "flop_budget",
                           "device_seconds": "device_second_budget"}[self.budget_spent()],
            "budget": {k: v for k, v in self.limits.items() if v > 0},
            "spent": self.spent(),
        }

    def write(self, run_dir: Path, is_main: bool, **kw) -> dict:
        cost = self.cost(**kw)
        if is_main:
            rundir.write_json(Path(run_dir) / "cost.json", cost)
        return cost
