"""Command line: ``rlbench run | suite | report | eval | probe | reward | task check | config | env | plugins |
export`` (and ``--version``)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def quiet_stdout(on: bool = True):
    """Send everything written to stdout (file descriptor 1, so libraries' and subprocesses' output
    too) to stderr while the block runs: with ``--json`` stdout holds the JSON alone."""
    if not on:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _cmd_plugins(args) -> int:
    from rlbench import manager

    rows = [{"kind": e.kind, "name": e.name, "module": e.module,
             "target": e.target if isinstance(e.target, str) else repr(e.target), "source": e.source}
            for e in manager.entries()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for kind in manager.KINDS:
        items = [r for r in rows if r["kind"] == kind]
        print(f"{kind}s:")
        for r in items:
            print(f"  {r['name']:<16} {r['target']:<55} (from {r['source']})")
    return 0


def _cmd_run(args) -> int:
    from rlbench import config as cfgmod
    from rlbench.training import dist
    from rlbench.training import trainer as trmod

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise cfgmod.ConfigError(f"--resume {run_dir}: no config.yaml there (not a run directory)")
        cfg = cfgmod.load(run_dir / "config.yaml", args.set or [])
        done = trmod.finished(run_dir, cfg)
        if done:  # nothing to redo, nothing rewritten
            print(f"rlbench: {run_dir}: nothing to resume: {done}; raise train.steps or the budget with --set to "
                  f"continue it", file=sys.stderr)
            return 0
        trainer = trmod.start(cfg, run_dir, resume=True)
    else:
        if not args.config:
            raise cfgmod.ConfigError("rlbench run needs a CONFIG file (or --resume RUN_DIR)")
        cfg = cfgmod.load(args.config, args.set or [])
        run_dir = Path(args.out) / cfg.run.name
        trainer = trmod.start(cfg, run_dir)
    quiet = dist.launch_rank() != 0  # under accelerate launch, rank 0 reports
    engine = cfg.names["engine"]
    if cfg.names.get("engine_requested") == "auto":
        engine += " (engine.name auto: " + ("vllm imports)" if engine == "vllm" else "vllm is not installed)")
    if not quiet:
        print(f"rlbench: run directory {run_dir} (model {cfg.model.name}, task {cfg.names['task']}, "
              f"algorithm {cfg.names['algorithm']}, engine {engine})", file=sys.stderr)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if summary.get("interrupted"):  # SIGINT / SIGTERM: checkpoint written, resumable
        import signal

        return 128 + int(getattr(signal, summary["interrupted"]))
    evals = summary.get("eval", [])
    if quiet:
        return 0
    if evals:
        first, last = evals[0], evals[-1]
        print(f"held-out accuracy: step {first['step']} {first['accuracy']:.3f} ± {first['stderr']:.3f} → "
              f"step {last['step']} {last['accuracy']:.3f} ± {last['stderr']:.3f} (n={last['n']})")
    print(f"wall time {summary['wall_seconds_total']:.0f} s; run directory: {run_dir}")
    return 0


def _eval_config(task: str, model: str, sets: list[str], engine: str | None = None):
    """A validated task (and engine) config through the same strict config code as runs."""
    from rlbench import config as cfgmod

    raw = {"model": {"name": model}, "task": {"name": task}}
    if engine:
        raw["engine"] = {"name": engine}
    return cfgmod.resolve(raw, [s if s.split(".", 1)[0] in cfgmod.CORE_SECTIONS or s.startswith(("task.", "engine."))
                                else "task." + s for s in sets])


def _cmd_eval(args) -> int:
    from rlbench import manager

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    known = sorted({e.name for e in manager.entries("task")})
    for name in names:
        if name not in known:
            manager.get("task", name)  # the PluginError names the tasks there are
    if len(names) > 1 and args.output:
        raise FileNotFoundError("rlbench eval: --output names one file; with several --tasks each gets eval-TASK-SPLIT.json")
    for name in names:
        rc = _eval_one(args, name)
        if rc:
            return rc
    return 0


def _eval_one(args, task_name: str) -> int:
    from rlbench.config import ConfigError
    from rlbench.training.evaluation import EvalPlan, evaluate
    from rlbench.training.sampler import standalone

    for flag, value in (("--limit", args.limit), ("--samples", args.samples), ("--max-tokens", args.max_tokens)):
        if value < 1:  # an evaluation of nothing has no accuracy: say so instead of printing 0.000
            raise ConfigError(f"rlbench eval: {flag} must be >= 1, got {value}")
    cfg = _eval_config(task_name, args.model, args.set or [], args.engine)
    with standalone(cfg) as (engine, task, generate):
        rec, _ = evaluate(engine, task, EvalPlan(args.split, args.limit, args.samples, args.max_tokens,
                                                 temperature=args.temperature, keep_completions=True), generate=generate)
    if rec["n"] == 0:  # the split is empty, or every prompt was too long
        raise ConfigError(f"rlbench eval: no problems to evaluate in the {args.split!r} split of task "
                          f"{cfg.names['task']!r}")
    info = getattr(task, "manifest_info", None)
    out = {"model": cfg.model.name, "task": cfg.names["task"], "engine": cfg.names["engine"], "max_tokens": args.max_tokens,
           "temperature": None if args.samples == 1 else args.temperature, "task_config": cfg.to_dict()["task"],
           **({"task_info": info()} if info else {}), **rec}
    path = Path(args.output or f"eval-{cfg.names['task']}-{args.split}.json")
    path.write_text(json.dumps(out, indent=2))
    lo, hi = rec["ci95"]
    ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in rec["pass@k"].items() if k != "1")
    print(f"{cfg.names['task']} {args.split} n={rec['n']} samples={rec['samples']}: accuracy {rec['accuracy']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}){'; ' + ks if ks else ''}; format rate {rec['format_rate']:.3f}; "
          f"{rec['time']:.0f} s; written to {path}")
    return 0


def _cmd_probe(args) -> int:
    from rlbench import config as cfgmod
    from rlbench.suites import probe

    if args.prompts < 1:
        raise cfgmod.ConfigError(f"rlbench probe: --prompts must be >= 1, got {args.prompts}")
    cfg = cfgmod.load(args.config, args.set or [])
    with quiet_stdout(args.json):  # --json: the JSON is the only thing on stdout (vLLM logs there)
        rec = probe.run(cfg, args.prompts)
    if args.output:
        Path(args.output).write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec, indent=2) if args.json else probe.table(rec))
    return 0


def _cmd_reward(args) -> int:
    from rlbench import manager
    from rlbench.modeling import models
    from rlbench.training.evaluation import score_rows
    from rlbench.tasks.common import read_jsonl

    cfg = _eval_config(args.task, args.model, args.set or [])
    task = manager.get("task", cfg.names["task"])(cfg.task, models.load_tokenizer(cfg.model.name))
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input}: no such file")
    rows = read_jsonl(args.input, ("completion",))
    scored = score_rows(task, rows, where=args.input)
    lines = "".join(json.dumps(r) + "\n" for r in scored)
    if args.output:
        Path(args.output).write_text(lines)
    else:
        sys.stdout.write(lines)
    n = len(scored)
    acc = sum(r["components"].get("accuracy", 0.0) for r in scored) / n
    print(f"{n} completions: mean reward {sum(r['reward'] for r in scored) / n:.3f}, accuracy {acc:.3f}",
          file=sys.stderr)
    return 0


def _cmd_task(args) -> int:
    from rlbench import config as cfgmod
    from rlbench.training import task_check

    cfg = cfgmod.load(args.config, args.set or [])
    result = task_check.check(cfg)
    print(result.format())
    reason = task_check.refusal(cfg, result)
    if reason:
        print(f"rlbench: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_suite(args) -> int:
    from rlbench.suites import suite

    if args.action == "run":
        summary = suite.run_suite(args.target, args.out, jobs=args.jobs, executor_name=args.executor,
                                  echo=lambda m: print(m, file=sys.stderr, flush=True), overrides=args.set or [])
        if summary["interrupted"] or summary["pending"]:
            return 130  # stopped (SIGINT / SIGTERM / suite cancel): resumable
        return 0 if summary["failed"] == 0 else 1
    if args.action == "plan":
        from rlbench.suites import plan as planmod

        return planmod.command(args)
    if args.action == "cancel":
        ids = suite.cancel_suite(args.target)
        print(f"cancelled {len(ids)} job(s): {' '.join(ids)}" if ids else "no queued or running jobs")
        return 0
    print(suite.status_text(args.target))
    return 0


def _cmd_report(args) -> int:
    from rlbench.reporting.report import build

    command = "rlbench report " + " ".join(args.dirs) + f" --out {args.out}" + (
        f" --baseline {args.baseline}" if args.baseline else "") + (f" --mde {args.mde:g}" if args.mde else "") + (
        f" --x {args.x}" if args.x != "flops" else "")
    res = build(args.dirs, args.out, baseline=args.baseline, title=args.title, command=command, mde=args.mde, x=args.x)
    print(f"{len(res['summary'])} runs; report in {args.out}/report.md, report.html, summary.csv, aggregate.csv"
          + (f"; {len(res['flags'])} infrastructure differences flagged" if res["flags"] else ""))
    return 0


def _cmd_export(args) -> int:
    from rlbench.training.export import export

    out = export(args.run_dir, args.out, step=args.step)
    print(f"exported to {out}")
    return 0


def _cmd_config(args) -> int:
    from rlbench import config as cfgmod

    cfg = cfgmod.load(args.config, args.set or [])
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
    else:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_env(args) -> int:
    from rlbench import about

    info = about.environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k != "plugins":
            print(f"{k:<14} {v}")
    print("plugins:")
    for e in info["plugins"]:
        print(f"  {e['kind']:<12} {e['name']:<16} {e['module']:<40} (from {e['from']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlbench", description="Benchmark RL post-training algorithms for LMs.")
    from rlbench import about

    p.add_argument("--version", action="version", version=f"rlbench {about.version()}")
    sub = p.add_subparsers(dest="command", required=True)

    cf = sub.add_parser("config", help="print the resolved config (defaults filled, --set applied) without running")
    cf.add_argument("config", help="YAML config file")
    cf.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    cf.add_argument("--json", action="store_true", help="JSON instead of YAML")
    cf.set_defaults(func=_cmd_config)

    en = sub.add_parser("env", help="versions, device and plugins: the first thing a bug report needs")
    en.add_argument("--json", action="store_true")
    en.set_defaults(func=_cmd_env)

    r = sub.add_parser("run", help="train one configuration")
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    r.add_argument("--out", default="runs", help="parent directory of the run directory (default: runs)")
    r.add_argument("--resume", metavar="RUN_DIR", help="resume a run from its newest complete checkpoint")
    r.set_defaults(func=_cmd_run)

    su = sub.add_parser("suite", help="run a benchmark suite (algorithms x tasks x seeds) or show its status")
    su.add_argument("action", choices=["run", "plan", "status", "cancel"])
    su.add_argument("target", help="run, plan: the suite YAML; status, cancel: the suite's output directory")
    su.add_argument("--out", default="runs/suites", help="parent of the suite directory (default runs/suites)")
    su.add_argument("--jobs", type=int, default=None, help="local executor: runs at a time (default 1)")
    su.add_argument("--executor", help="where runs execute: local (default), slurm, ray, or the suite's executor: section")
    su.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="run: override a config value in every run (recorded in the suite's suite.json)")
    su.add_argument("--mde", type=float, help="plan: the difference to detect (e.g. 0.05)")
    su.add_argument("--sd", type=float, help="plan: the standard deviation of paired per-seed differences (a prior)")
    su.add_argument("--sd-from", metavar="REPORT_DIR", help="plan: read that sd from an earlier report's power.csv")
    su.add_argument("--accelerator", default="H100", help="plan: a name in the price table's peak_flops (default H100)")
    su.add_argument("--mfu", type=float, default=0.4, help="plan: the share of peak FLOP/s reached (default 0.4)")
    su.add_argument("--completion-frac", type=float, default=1.0,
                    help="plan: the expected completion length as a share of rollout.max_tokens (default 1.0: an upper bound)")
    su.add_argument("--measure", action="store_true", help="plan: measure each config's FLOPs per step by one real step")
    su.add_argument("--json", action="store_true", help="plan: JSON instead of the table")
    su.set_defaults(func=_cmd_suite)

    rp = sub.add_parser("report", help="compare runs: summary.csv, aggregate.csv, report.md, report.html, plots")
    rp.add_argument("dirs", nargs="+", help="run directories and/or suite directories")
    rp.add_argument("--out", required=True, help="report directory, e.g. reports/NAME")
    rp.add_argument("--baseline", help="algorithm group the others are tested against (default: the suite's baseline, else grpo)")
    rp.add_argument("--title")
    rp.add_argument("--mde", type=float, help="a difference to size the seeds for (e.g. 0.02): seeds needed to detect it")
    rp.add_argument("--x", default="flops", choices=["flops", "tokens", "device_hours", "wall_seconds"],
                    help="compute axis of the accuracy-vs-compute curves (default flops)")
    rp.set_defaults(func=_cmd_report)

    ev = sub.add_parser("eval", help="accuracy / pass@k of a model on a task's held-out split")
    ev.add_argument("--model", default="smollm2-135m-instruct", help="alias, local path or hub id")
    ev.add_argument("--tasks", "--task", dest="tasks", required=True,
                    help="a task, or several separated by commas (lm-eval's --tasks a,b): one JSON file each")
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int, default=200, help="number of problems (default 200)")
    ev.add_argument("--samples", type=int, default=1, help="samples per problem: 1 = greedy; k > 1 gives pass@k")
    ev.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    ev.add_argument("--max-tokens", type=int, default=512)
    ev.add_argument("--engine", default="auto", help="rollout engine (auto: vllm when installed, else hf)")
    ev.add_argument("--set", action="append", metavar="[task.]KEY=VALUE", help="a task (or engine) option")
    ev.add_argument("--output", help="JSON file (default eval-TASK-SPLIT.json)")
    ev.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("probe", help="is the task learnable from this config? base accuracy, groups with no signal, verdict")
    pr.add_argument("config", help="YAML config file (its model, engine, task and sampling settings are used)")
    pr.add_argument("--prompts", type=int, default=32, help="train prompts to sample (default 32)")
    pr.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    pr.add_argument("--json", action="store_true", help="print the record as JSON instead of the table")
    pr.add_argument("--output", help="also write the record to this JSON file")
    pr.set_defaults(func=_cmd_probe)

    rw = sub.add_parser("reward", help="score completions from a JSONL file with a task's reward function")
    rw.add_argument("task")
    rw.add_argument("--input", required=True, help="JSONL: completion plus the reference (answer / task_id)")
    rw.add_argument("--output", help="JSONL with reward and components added (default: stdout)")
    rw.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer builds prompts and counts tokens")
    rw.add_argument("--set", action="append", metavar="[task.]KEY=VALUE", help="a task option")
    rw.set_defaults(func=_cmd_reward)

    tk = sub.add_parser("task", help="check a task before training: rows, prompts, references, gold self-check, overlap")
    tk.add_argument("action", choices=["check"])
    tk.add_argument("config", help="YAML config file (its model's tokenizer and its task section are used)")
    tk.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    tk.set_defaults(func=_cmd_task)

    pl = sub.add_parser("plugins", help="list plugins by kind")
    pl.add_argument("--json", action="store_true", help="print a JSON list of {kind, name, module, …}")
    pl.set_defaults(func=_cmd_plugins)

    e = sub.add_parser("export", help="export a checkpoint as a plain Hugging Face model directory")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from rlbench.config import ConfigError
    from rlbench.manager import PluginError
    from rlbench.modeling.models import ModelError
    from rlbench.training.faults import TrainingError
    from rlbench.tasks.sandbox import SandboxError
    from rlbench.types import DataError
    from rlbench.reporting.runs import ReportError

    try:
        return args.func(args)
    except (ConfigError, PluginError, ModelError, TrainingError, DataError, FileNotFoundError, SandboxError,
            ReportError) as e:
        print(f"rlbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
