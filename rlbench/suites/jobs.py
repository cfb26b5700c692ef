"""The suite's job loop: every run is one job on an executor (local processes, Slurm, Ray).

The same semantics on every executor (``rlbench_executors`` in rlbench/hookspecs.py):

* a run is one job; ``status.json`` records each run's executor, job id and state;
* a suite started again re-attaches to its jobs that are still queued or running (it never
  submits a duplicate), skips complete runs, resumes interrupted ones from their newest
  checkpoint (``rlbench run --resume``) and retries failed ones up to ``max_attempts`` in all,
  recording the end of the job's log on failure;
* a job that ends is judged by its run directory, not by the scheduler: complete when the run
  wrote ``cost.json`` (its last act), else failed (or, when it left a checkpoint, resumed next);
* SIGINT / SIGTERM to the driver, or ``rlbench suite cancel``, stops the suite: running jobs are
  cancelled (they checkpoint), marked ``interrupted`` and resumed by the next ``suite run``; no new
  job starts.

A multi-process run (``processes`` > 1) is started as ``accelerate launch`` on every machine of
the job (``launch_command``); the executor supplies the machine rank and the main address from
the scheduler's environment.

Not covered: dependencies between jobs, job arrays, a scheduler's own retry counting.
"""
from __future__ import annotations

import dataclasses
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from rlbench.types import Executor

ACTIVE = ("queued", "running")  # states an executor's poll() may return, besides "done" and "gone"


@dataclass
class Job:
    """One run as an executor sees it."""

    name: str
    args: list[str]  # the arguments of ``rlbench run`` (config and --out, or --resume DIR)
    run_dir: Path
    log: Path
    env: dict = field(default_factory=dict)
    processes: int = 1  # processes per machine (accelerate launch --num_processes on each)
    how: str = "started"  # or "resumed" (from its newest checkpoint)
    stop_seconds: float = 60.0  # how long a stopped job may take to write its checkpoint

    def command(self, machines: int = 1, machine_rank: int = 0, main_ip: str = "127.0.0.1",
                port: int | None = None) -> list[str]:
        return launch_command(self.args, self.processes, machines, machine_rank, main_ip, port)


def launch_command(args: list[str], processes: int = 1, machines: int = 1, machine_rank: int = 0,
                   main_ip: str = "127.0.0.1", port: int | None = None) -> list[str]:
    """``python -m rlbench.cli run ARGS``, or ``accelerate launch`` over ``machines`` × ``processes``.
    On one machine the main port defaults to a free one (accelerate's own default, 29500, would
    collide between runs started side by side); machines of one run must be given the same port."""
    run = ["-m", "rlbench.cli", "run", *args]
    if processes * machines <= 1:
        return [sys.executable, *run]
    if port is None:
        if machines > 1:
            raise ValueError("a launch over several machines needs one main port that every machine is given")
        port = free_port()
    # Accelerate's multi-GPU launcher (torchrun); without GPUs each process runs on the CPU over gloo
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--rdzv_backend", "static", "--same_network",
            "--num_processes", str(processes * machines), "--num_machines", str(machines),
            "--machine_rank", str(machine_rank), "--main_process_ip", main_ip, "--main_process_port", str(port), *run]


def free_port() -> int:
    """A TCP port free on every address now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def settings(executor: Executor) -> dict:
    """The resolved executor settings, for status.json."""
    cfg = executor.config
    return {"name": executor.name, **(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {})}


@dataclass(frozen=True)
class RunCallbacks:
    """What the job loop asks the suite about one run, by name."""

    make_job: Callable[[str], Job]  # the Job (fresh or resuming, decided when it is submitted)
    # an ended job: "complete", "resume" (it left a checkpoint: an interruption, a preemption, a
    # time limit) or "failed"
    finish: Callable[[str], str]
    tail: Callable[[str], str]  # the end of its log
    # seconds the run may need, once stopped, to finish its step and write its checkpoint (from its
    # own steps so far: a multi-turn step takes minutes); a stop waits at least this long for it
    grace: Callable[[str], float] = lambda name: 0.0


class StopRequest:
    """SIGINT / SIGTERM to the suite driver (or ``rlbench suite cancel``, which signals it) while
    the job loop runs: the loop stops its running jobs and starts no new one."""

    def __init__(self):
        self.signal: int | None = None
        self._saved: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        return False

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signal).name if self.signal else ""


def stop_all(active: dict, executor: Executor, status, runs: RunCallbacks, why: str, wait_s: float, echo) -> dict:
    """Stop every active job (the executor's cancel: a run finishes its step and writes a
    checkpoint), wait for each up to ``wait_s`` or its own ``runs.grace`` if longer, and mark each
    ``interrupted`` (or complete, if it finished meanwhile). A job still running after its wait is
    cancelled again (local: killed)."""
    results = {}
    if active:
        executor.cancel(list(active.values()))
    start = time.monotonic()
    waits = {name: max(wait_s, runs.grace(name)) for name in active}
    while active:  # each ends, or is killed at its own deadline
        states = executor.poll(list(active.values()))
        for name, jid in list(active.items()):
            if states.get(jid, "gone") not in ACTIVE:
                del active[name]
                verdict = runs.finish(name)
                if verdict == "complete":
                    status.set(name, status="complete", state="done", finished=_now())
                    results[name] = "complete"
                else:
                    status.set(name, status="interrupted", state="done", finished=_now(),
                               error=f"stopped by {why}; the next `rlbench suite run` "
                                     + ("resumes it from its newest checkpoint" if verdict == "resume" else "starts it again"))
                    results[name] = "interrupted"
                echo(f"  {name}: {results[name]} ({why})")
        for name, jid in list(active.items()):
            if time.monotonic() >= start + waits[name]:  # did not stop in time
                del active[name]
                kill = getattr(executor, "kill", None)
                (kill or executor.cancel)([jid])
                status.set(name, status="interrupted", state="killed", finished=_now(),
                           error=f"stopped by {why}; it did not stop within {waits[name]:.0f} s and was killed")
                results[name] = "interrupted"
                echo(f"  {name}: killed ({why}; no checkpoint within {waits[name]:.0f} s)")
        if active:
            time.sleep(0.5)
    return results


def run_jobs(todo: list, executor: Executor, status, runs: RunCallbacks, *, max_attempts: int = 2,
             poll_seconds: float = 2.0, echo=print) -> dict[str, str]:
    """Run every (name, cfg) in ``todo`` to completion on ``executor``; returns name -> result.
    ``runs`` builds, judges and tails each run's job (the executor's ``note(job_id)``, when it has
    one, is added to the tail of a failed one: e.g. Slurm's reason). SIGINT or SIGTERM to this
    process (``rlbench suite cancel`` sends SIGTERM) stops the suite: the running jobs checkpoint
    and end as ``interrupted``, no new job starts, and the queued runs stay pending."""
    with StopRequest() as stop:
        return _loop(todo, executor, status, runs, Pacing(max_attempts, poll_seconds, echo), stop)


@dataclass(frozen=True)
class Pacing:
    """How the job loop retries, waits and speaks."""

    max_attempts: int
    poll_seconds: float
    echo: Callable


def _loop(todo, executor, status, runs, pacing: Pacing, stop) -> dict[str, str]:
    max_attempts, poll_seconds, echo = pacing.max_attempts, pacing.poll_seconds, pacing.echo
    results: dict[str, str] = {}
    active: dict[str, str] = {}  # name -> job id
    failures: dict[str, int] = {}  # this controller's failed jobs per run (resumable ends do not count)
    ends: dict[str, int] = {}
    queue = []
    for name, _ in todo:
        st = status.get(name)
        jid = st.get("job_id")
        if jid and st.get("executor") == executor.name and st.get("state") in ACTIVE:
            state = executor.poll([jid]).get(jid, "gone")
            if state in ACTIVE:  # still queued or running from an earlier controller: wait for it
                active[name] = jid
                status.set(name, state=state, status="running")
                echo(f"  {name}: re-attached to job {jid} ({state})")
                continue
        queue.append(name)
    wait_s = 60.0
    while queue or active:
        if stop.signal is not None:
            echo(f"suite: {stop.name}: stopping {len(active)} running job(s); {len(queue)} not started")
            results.update(stop_all(active, executor, status, runs, f"{stop.name} to the suite", wait_s, echo))
            break
        while queue and len(active) < executor.parallel:
            name = queue.pop(0)
            st = status.get(name)
            attempts = st.get("attempts", 0)
            job = runs.make_job(name)
            wait_s = max(wait_s, job.stop_seconds)
            jid = executor.submit(job)
            active[name] = jid
            status.set(name, status="running", executor=executor.name, job_id=jid, state="queued",
                       job_ids=[*st.get("job_ids", []), jid], attempts=attempts + 1, how=job.how, error=None,
                       started=_now())
            echo(f"  {name}: {job.how} as job {jid}")
        if not active:
            break
        states = executor.poll(list(active.values()))
        for name, jid in list(active.items()):
            state = states.get(jid, "gone")
            if state in ACTIVE:
                if status.get(name).get("state") != state:
                    status.set(name, state=state)
                continue
            del active[name]
            verdict = runs.finish(name)
            status.set(name, state=state)
            if verdict == "complete":
                status.set(name, status="complete", finished=_now())
                results[name] = "complete"
                echo(f"  {name}: complete")
                continue
            note = getattr(executor, "note", None)
            text = runs.tail(name) + (f"\n{executor.name} job {jid}: {note(jid)}" if note else "")
            status.set(name, status="failed", finished=_now(), error=text)
            failures[name] = failures.get(name, 0) + (verdict != "resume")
            ends[name] = ends.get(name, 0) + 1
            if failures[name] < max_attempts and ends[name] < 10 * max_attempts:
                echo(f"  {name}: job {jid} ended without finishing the run; "
                     + ("resuming from its checkpoint" if verdict == "resume" else
                        f"retrying ({failures[name]} of {max_attempts} attempts failed)"))
                queue.append(name)
            else:
                results[name] = "failed"
                echo(f"  {name}: failed ({failures[name]} failed attempt(s) in this start); see status.json")
        if active:
            end = time.monotonic() + poll_seconds
            while time.monotonic() < end and stop.signal is None:
                time.sleep(min(0.2, poll_seconds))
    return results


def cancel(executor: Executor, status) -> list[str]:
    """Cancel the suite's queued and running jobs on ``executor``; returns their job ids."""
    ids = [st["job_id"] for st in status.data["runs"].values()
           if st.get("job_id") and st.get("executor") == executor.name and st.get("state") in ACTIVE]
    if ids:
        executor.cancel(ids)
    for name, st in status.data["runs"].items():
        if st.get("job_id") in ids:
            status.set(name, state="cancelled", status="interrupted",
                       error="stopped by rlbench suite cancel (no driver was running); the next `rlbench suite run` "
                             "resumes it from its newest checkpoint")
    return ids


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
