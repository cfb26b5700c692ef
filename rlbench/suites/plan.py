"""``rlbench suite plan``: what a suite will cost, and whether it can answer, before it runs.

Per run: the FLOPs, counted as the cost meter counts them (rlbench/training/cost.py: 2N per
token of every forward pass, 6N per trained token), from

  * the budget, when the suite sets ``flops`` (a run spends it plus less than one step);
  * ``--measure``: one real step of the run's config (hf engine, evaluation off) in a temporary
    directory, its cost.json's FLOPs times the steps (one measurement per distinct config; seeds
    share it);
  * otherwise an estimate per step: B × G sequences of the task's mean prompt length (its first
    32 train prompts through the tokenizer) and ``completion_frac`` × ``rollout.max_tokens``
    generated tokens; the reference pass when the algorithm or ``eval.kl`` asks for it, the
    old-policy pass for several optimizer steps per batch, the critic's passes; trained tokens
    over every epoch. Completions that stop early make this an upper bound at ``completion_frac`` 1.

Then device-hours on ``--accelerator`` at ``--mfu`` of its peak (``peak_flops`` in the price
table), their price (``gpu_hour``), the wall time at ``--jobs`` runs at a time, and, from the
standard deviation of paired per-seed differences (``--sd``, or read from an earlier report's
power.csv with ``--sd-from``), the seeds a ``--mde`` difference needs at 80% power and what the
suite costs at that seed count.

Not covered: evaluation FLOPs (the same for every algorithm; not metered either), a ``tokens`` or
``device_seconds`` budget (the FLOPs then come from the steps).
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from rlbench import config as cfgmod
from rlbench import manager
from rlbench.power import ALPHA, POWER, seeds_needed
from rlbench.suites import suite as suitemod


def n_params(model_name: str, cfg) -> int:
    """The policy's parameter count, from its config on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlbench.modeling import models

    if model_name == models.TINY:
        model, _ = models.load(models.TINY, seed=0, tiny_layers=cfg.model.tiny_layers, tiny_hidden=cfg.model.tiny_hidden)
        return sum(p.numel() for p in model.parameters())
    src = models.embedded_model_dir() if model_name == models.EMBEDDED else model_name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    return sum(p.numel() for p in model.parameters())


def mean_prompt_tokens(cfg) -> float:
    from rlbench.modeling import models

    tok = models.load_tokenizer(cfg.model.name)
    task = manager.get("task", cfg.names["task"])(cfg.task, tok)
    prompts = task.prompts("train", 32, seed=0)
    return sum(len(p.token_ids or tok(p.text, add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts)


def step_flops(cfg, N: int, prompt: float, completion: float) -> float:
    """FLOPs of one training step, counted as rlbench/training/cost.py counts them."""
    needs = manager.get("algorithm", cfg.names["algorithm"]).needs(cfg.algorithm)
    S = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    seq = S * (prompt + completion)
    forward = S * prompt + S * completion  # rollouts: prefill and generated tokens
    if needs.reference or cfg.eval.kl:
        forward += seq
    if needs.old_logprobs or needs.epochs * needs.mini_batches > 1:
        forward += seq
    critic = N if needs.critic else 0
    return 2 * N * forward + 6 * (N + critic) * seq * needs.epochs + 2 * critic * (seq if needs.critic else 0)


def measured_step_flops(cfg) -> float:
    """One real step of ``cfg`` (hf engine, no evaluation, no checkpoint) in a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        raw = cfg.to_dict()
        raw["train"].update(steps=1, checkpoint_every=0, max_flops=0.0, max_device_seconds=0.0, max_generated_tokens=0)
        raw["eval"].update(before=False, after=False, at_budget_fractions=[])
        raw["logging"].update(loggers=[], progress=False)
        raw["engine"] = {"name": "hf"}
        raw["run"]["name"] = "measure"
        path.write_text(json.dumps(raw))
        r = subprocess.run([sys.executable, "-m", "rlbench.cli", "run", str(path), "--out", tmp], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise cfgmod.ConfigError(f"suite plan --measure: the one-step run failed: {r.stderr.strip()[-500:]}")
        return json.loads((Path(tmp) / "measure" / "cost.json").read_text())["flops_estimate"]


@dataclasses.dataclass(frozen=True)
class Assumptions:
    accelerator: str = "H100"
    mfu: float = 0.4
    jobs: int = 1
    completion_frac: float = 1.0
    measure: bool = False
    mde: float | None = None
    sd: float | None = None


def sd_from_report(report_dir: str | Path) -> float:
    """The median standard deviation of paired differences in an earlier report's power.csv."""
    import pandas as pd

    path = Path(report_dir) / "power.csv"
    if not path.is_file():
        raise FileNotFoundError(f"--sd-from {report_dir}: no power.csv there (a report of a suite with seeds)")
    sds = pd.read_csv(path)["sd_diff"].dropna()
    if sds.empty:
        raise FileNotFoundError(f"--sd-from {report_dir}: power.csv has no standard deviation of paired differences")
    return float(sds.median())


def plan(spec: dict, how: Assumptions) -> dict:
    """Every run's FLOPs and the suite's device-hours, price, wall time and power (module docstring)."""
    from rlbench.training.cost import price_table

    prices, _ = price_table()
    peak = {k.lower(): v for k, v in (prices.get("peak_flops") or {}).items()}.get(how.accelerator.lower())
    rate = {k.lower(): v for k, v in (prices.get("gpu_hour") or {}).items()}.get(how.accelerator.lower())
    if peak is None:
        raise cfgmod.ConfigError(f"suite plan: no peak_flops for accelerator {how.accelerator!r} in the price table "
                                 f"(it has {', '.join(prices.get('peak_flops') or {}) or 'none'}); RLBENCH_PRICES can add one")
    runs = suitemod.expand(spec)
    budget_flops = float((spec.get("budget") or {}).get("flops") or 0)
    cache: dict = {}
    rows = []
    for name, cfg in runs:
        key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "run"}, sort_keys=True, default=str)
        if key not in cache:
            if budget_flops:
                cache[key] = ("budget", budget_flops / cfg.train.steps if cfg.train.steps else budget_flops)
            elif how.measure:
                cache[key] = ("measured", measured_step_flops(cfg))
            else:
                N = n_params(cfg.model.name, cfg)
                cache[key] = ("estimate", step_flops(cfg, N, mean_prompt_tokens(cfg),
                                                     how.completion_frac * cfg.rollout.max_tokens))
        source, per_step = cache[key]
        flops = budget_flops if source == "budget" else per_step * cfg.train.steps
        hours = flops / (peak * how.mfu) / 3600
        rows.append({"run": name, "seed": cfg.run.seed, "source": source, "flops": flops, "device_hours": hours,
                     "price_usd": hours * rate if rate is not None else None})
    total_h = sum(r["device_hours"] for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    out = {"suite": spec["name"], "runs": rows, "flops": sum(r["flops"] for r in rows), "device_hours": total_h,
           "price_usd": total_h * rate if rate is not None else None, "wall_hours": total_h / how.jobs,
           "accelerator": how.accelerator, "mfu": how.mfu, "jobs": how.jobs, "seeds": len(seeds)}
    if how.mde and how.sd:
        need = seeds_needed(how.mde / how.sd, ALPHA, POWER)
        per_seed = total_h / max(1, len(seeds))
        out.update(mde=how.mde, sd=how.sd, seeds_needed=need,
                   device_hours_at_seeds=per_seed * need if math.isfinite(need) else math.inf,
                   price_usd_at_seeds=(per_seed * need * rate) if rate is not None and math.isfinite(need) else None)
    return out


def table(p: dict) -> str:
    lines = [f"suite {p['suite']}: {len(p['runs'])} runs on {p['accelerator']} at {p['mfu']:.0%} MFU, {p['jobs']} at a time"]
    for r in p["runs"]:
        price = f"${r['price_usd']:,.2f}" if r["price_usd"] is not None else "-"
        lines.append(f"  {r['run']:<40} {r['flops']:.3g} FLOPs ({r['source']})  {r['device_hours']:.3g} device-h  {price}")
    price = f"${p['price_usd']:,.2f}" if p["price_usd"] is not None else "no price for this accelerator"
    lines.append(f"total: {p['flops']:.3g} FLOPs, {p['device_hours']:.3g} device-hours, {price}, "
                 f"{p['wall_hours']:.3g} h wall at {p['jobs']} job(s)")
    if "seeds_needed" in p:
        need = p["seeds_needed"]
        lines.append(f"power: detecting a difference of {p['mde']:g} with paired-difference sd {p['sd']:g} at 80% power "
                     f"(two-sided α 0.05) needs {need:.0f} seeds; this suite has {p['seeds']}"
                     + (f"; at {need:.0f} seeds it costs {p['device_hours_at_seeds']:.3g} device-hours"
                        + (f" (${p['price_usd_at_seeds']:,.2f})" if p["price_usd_at_seeds"] is not None else "")
                        if math.isfinite(need) else ""))
    return "\n".join(lines)


def command(args) -> int:
    """``rlbench suite plan`` from its parsed arguments: the table (or JSON) on stdout."""
    sd = args.sd if args.sd is not None else (sd_from_report(args.sd_from) if args.sd_from else None)
    if args.mde is not None and sd is None:
        raise cfgmod.ConfigError("rlbench suite plan --mde needs --sd (the sd of paired per-seed differences) or "
                                 "--sd-from REPORT")
    how = Assumptions(accelerator=args.accelerator, mfu=args.mfu, jobs=args.jobs or 1,
                      completion_frac=args.completion_frac, measure=args.measure, mde=args.mde, sd=sd)
    p = plan(suitemod.load(args.target, args.set or []), how)
    print(json.dumps(p, indent=2, default=float) if args.json else table(p))
    return 0
