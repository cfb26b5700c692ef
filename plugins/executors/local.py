"""The local executor (the default): each run is a process on this machine, ``jobs`` at a time.

A job id is the process id; each run is a session of its own. SIGINT (Ctrl-C) or SIGTERM to the
suite controller, or ``rlbench suite cancel``, stops its runs (one SIGTERM each: they checkpoint)
and the controller ends after them. A controller killed outright (SIGKILL) takes its runs with it:
each gets SIGTERM from the kernel (PR_SET_PDEATHSIG), checkpoints and ends, and the next controller
resumes it. (Where that is not available, a run outlives a killed controller and a new controller
re-attaches to it by its process id and command line.)

Not covered: a run on another machine; re-attaching after this machine reboots (the run is then
resumed from its checkpoint instead).
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import rlbench


@dataclass
class LocalConfig:
    jobs: int = 1  # runs at a time (rlbench suite run --jobs N)
    processes: int = 1  # processes per run (> 1: accelerate launch, data parallel)

    def validate(self):
        if self.jobs < 1 or self.processes < 1:
            raise ValueError(f"jobs and processes must be >= 1, got {self.jobs}, {self.processes}")


def _term_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent (the suite driver) exits (Linux prctl)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: a driver killed outright leaves its runs running (re-attached later)
        pass


class LocalExecutor:
    Config = LocalConfig
    name = "local"
    parallel: int  # jobs kept submitted at once (from the config)

    def __init__(self, config: LocalConfig, root: Path):
        self.config, self.root = config, Path(root)
        self.parallel = config.jobs
        self.procs: dict[str, tuple[subprocess.Popen, object]] = {}

    def submit(self, job) -> str:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        f = open(job.log, "a")
        cmd = job.command()
        f.write(f"\n=== {job.how}: {' '.join(cmd)}\n")
        f.flush()
        # its own session: a Ctrl-C in the driver's terminal reaches the driver only, which stops each
        # run with exactly one SIGTERM (a second signal would interrupt a run before its checkpoint);
        # and SIGTERM when the driver dies, however it dies (SIGKILL included): no run outlives it
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **job.env},
                             start_new_session=True, preexec_fn=_term_with_parent)
        self.procs[str(p.pid)] = (p, f)
        return str(p.pid)

    def poll(self, ids) -> dict[str, str]:
        out = {}
        for jid in ids:
            if jid in self.procs:
                p, f = self.procs[jid]
                if p.poll() is None:
                    out[jid] = "running"
                else:
                    f.close()
                    out[jid] = "done"
            else:  # started by an earlier controller: alive, and still an rlbench run of this suite?
                try:
                    cmdline = Path(f"/proc/{jid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmdline = ""
                out[jid] = "running" if "rlbench.cli" in cmdline and str(self.root) in cmdline else "gone"
        return out

    def cancel(self, ids) -> None:
        for jid in ids:
            try:
                os.kill(int(jid), signal.SIGTERM)  # the run finishes its step and writes a checkpoint
            except (ProcessLookupError, ValueError):
                pass

    def kill(self, ids) -> None:
        """A run that did not stop after ``cancel``: its whole process group, at once."""
        for jid in ids:
            try:
                os.killpg(int(jid), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass


@rlbench.hookimpl
def rlbench_executors():
    return {"local": LocalExecutor}
