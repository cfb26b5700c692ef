"""Command line: ``rlbench run | plugins | export``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


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
    from rlbench import trainer as trmod

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise cfgmod.ConfigError(f"--resume {run_dir}: no config.yaml there (not a run directory)")
        cfg = cfgmod.load(run_dir / "config.yaml", args.set or [])
        trainer = trmod.start(cfg, run_dir, resume=True)
    else:
        if not args.config:
            raise cfgmod.ConfigError("rlbench run needs a CONFIG file (or --resume RUN_DIR)")
        cfg = cfgmod.load(args.config, args.set or [])
        run_dir = Path(args.out) / cfg.run.name
        trainer = trmod.start(cfg, run_dir)
    engine = cfg.names["engine"]
    if cfg.names.get("engine_requested") == "auto":
        engine += " (engine.name auto: " + ("vllm imports)" if engine == "vllm" else "vllm is not installed)")
    print(f"rlbench: run directory {run_dir} (model {cfg.model.name}, task {cfg.names['task']}, "
          f"algorithm {cfg.names['algorithm']}, engine {engine})", file=sys.stderr)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    evals = summary.get("eval", [])
    if evals:
        first, last = evals[0], evals[-1]
        print(f"held-out accuracy: step {first['step']} {first['accuracy']:.3f} ± {first['stderr']:.3f} → "
              f"step {last['step']} {last['accuracy']:.3f} ± {last['stderr']:.3f} (n={last['n']})")
    print(f"wall time {summary['wall_seconds_total']:.0f} s; run directory: {run_dir}")
    return 0


def _cmd_export(args) -> int:
    from rlbench.export import export

    out = export(args.run_dir, args.out, step=args.step)
    print(f"exported to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlbench", description="Benchmark RL post-training algorithms for LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train one configuration")
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    r.add_argument("--out", default="runs", help="parent directory of the run directory (default: runs)")
    r.add_argument("--resume", metavar="RUN_DIR", help="resume a run from its newest complete checkpoint")
    r.set_defaults(func=_cmd_run)

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
    from rlbench.models import ModelError
    from rlbench.trainer import TrainingError
    from rlbench.types import DataError

    try:
        return args.func(args)
    except (ConfigError, PluginError, ModelError, TrainingError, DataError, FileNotFoundError) as e:
        print(f"rlbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
