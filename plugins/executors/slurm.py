"""The Slurm executor: each run is one ``sbatch`` job, submitted through submitit.

The job's tasks (``nodes`` × ``tasks_per_node``) each run ``rlbench run`` — a multi-process run as
``accelerate launch`` with ``--machine_rank`` = the task's rank and ``--main_process_ip`` = the
job's first node, both from Slurm's environment (submitit's ``JobEnvironment``), so one benchmark
cell can span nodes; on a real cluster that is one task per node with ``processes`` = its GPUs.
Near the time limit (or on preemption) Slurm sends SIGUSR2 (``signal_delay_s`` before the end);
submitit calls ``RunJob.checkpoint``, which asks the run to stop (SIGTERM: it finishes its step
and writes a checkpoint) and requeues the job, which resumes from that checkpoint
(``rlbench run --resume``), up to ``max_requeues`` times.

State comes from ``squeue`` (a job no longer listed has ended; its run directory says how), so
the executor works without Slurm's accounting database; ``note`` adds ``scontrol``'s state and
reason, or the end of submitit's error log, to a failed run's error.

Requires a file system shared by the submitting machine and the nodes (the suite directory holds
the configs, the run directories, the logs and submitit's job files under ``slurm/``).

Not covered: job arrays (one job per run keeps re-attaching simple), heterogeneous jobs,
``--exclusive`` by default (pass it in ``sbatch``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import rlbench
from rlbench.suites.suite import has_checkpoint


@dataclass
class SlurmConfig:
    partition: str = ""  # empty: the cluster's default partition
    account: str = ""
    qos: str = ""
    time_limit_min: int = 240  # per job; a run past it is requeued and resumes from its checkpoint
    nodes: int = 1
    tasks_per_node: int = 1  # accelerate "machines" per node (1 on a real cluster)
    processes: int = 1  # processes per task: accelerate launch --num_processes on each machine (its GPUs)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # 0: the partition's default
    sbatch: dict = field(default_factory=dict)  # extra sbatch options, e.g. {constraint: h100, exclusive: true}
    signal_delay_s: int = 90  # SIGUSR2 this long before the time limit: time for a step and a checkpoint
    max_requeues: int = 3  # time-limit requeues per job (submitit's max_num_timeout)
    parallel: int = 10_000  # jobs kept submitted at once (the scheduler queues the rest)
    folder: str = "slurm"  # submitit's job files, under the suite directory

    def validate(self):
        for k in ("time_limit_min", "nodes", "tasks_per_node", "processes", "cpus_per_task", "parallel"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


class RunJob:
    """What a Slurm task executes: the run, its output appended to the run's log. submitit pickles
    it; ``checkpoint`` is submitit's hook on SIGUSR2 (time limit, preemption)."""

    def __init__(self, job):
        self.job = job
        self.proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        job = self.job
        if job.args[0] != "--resume" and has_checkpoint(job.run_dir):  # a requeued job
            job.args, job.how = ["--resume", str(job.run_dir)], "resumed"
        port = 20000 + int(str(env.job_id).split("_")[0]) % 20000
        cmd = job.command(env.num_tasks, env.global_rank, env.hostnames[0], port)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as f:
            f.write(f"\n=== slurm job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}: "
                    f"{' '.join(cmd)}\n")
            f.flush()
            # SIGUSR2 is for submitit (this process): the run must not die of it
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **job.env},
                                         preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
            # poll, never block in wait(): submitit's SIGUSR2 handler (checkpoint) runs in this thread
            # and must be able to reap the process itself (a blocked wait() holds Popen's lock)
            while (rc := self.proc.poll()) is None:
                time.sleep(0.5)
        if rc != 0:
            raise RuntimeError(f"rlbench run exited with {rc} (log: {job.log})")
        return rc

    def checkpoint(self):
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # finish the step, write a checkpoint, exit
            deadline = time.time() + max(10, self.job.stop_seconds)
            while self.proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            if self.proc.poll() is None:
                self.proc.kill()
        fresh = RunJob(self.job)
        return submitit.helpers.DelayedSubmission(fresh)


class SlurmExecutor:
    Config = SlurmConfig
    name = "slurm"
    parallel: int  # jobs kept submitted at once (from the config)

    def __init__(self, config: SlurmConfig, root: Path):
        self.config, self.root = config, Path(root)
        self.parallel = config.parallel
        self.folder = self.root / config.folder

    def _executor(self, name: str):
        import submitit

        c = self.config
        ex = submitit.SlurmExecutor(folder=str(self.folder / "%j"), max_num_timeout=c.max_requeues)
        extra = {k: v for k, v in c.sbatch.items()}
        params = dict(job_name=f"rlbench-{name}", time=c.time_limit_min, nodes=c.nodes,
                      ntasks_per_node=c.tasks_per_node, cpus_per_task=c.cpus_per_task,
                      signal_delay_s=c.signal_delay_s, additional_parameters=extra)
        for key, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos)):
            if value:
                params[key] = value
        if c.gpus_per_node:
            params["gpus_per_node"] = c.gpus_per_node
        if c.mem_gb:
            params["mem"] = f"{int(c.mem_gb * 1024)}M"
        ex.update_parameters(**params)
        return ex

    def submit(self, job) -> str:
        job.stop_seconds = self.config.signal_delay_s - 5  # SIGUSR2 to the time limit, less a margin
        return str(self._executor(job.name).submit(RunJob(job)).job_id)

    def poll(self, ids) -> dict[str, str]:
        ids = [str(i) for i in ids]
        if not ids:
            return {}
        for attempt in range(4):  # the controller may be briefly unreachable
            r = subprocess.run(["squeue", "-h", "-o", "%i %T", "--me"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(2 ** attempt)
        else:
            raise RuntimeError(f"squeue failed: {r.stderr.strip()}")
        listed = dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)
        out = {}
        for jid in ids:
            state = listed.get(jid)
            out[jid] = ("queued" if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                                              "SUSPENDED", "RESV_DEL_HOLD")
                        else "running" if state is not None else "done")
        return out

    def cancel(self, ids) -> None:
        subprocess.run(["scancel", *map(str, ids)], check=False)

    def note(self, jid: str) -> str:
        r = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True, text=True)
        fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
        if fields.get("JobState"):
            return f"{fields['JobState']} (reason {fields.get('Reason', '?')}, exit {fields.get('ExitCode', '?')})"
        err = sorted(self.folder.glob(f"{jid}/*_0_log.err"))
        return "\n".join(err[0].read_text(errors="replace").splitlines()[-5:]) if err else "no longer known to Slurm"


@rlbench.hookimpl
def rlbench_executors():
    return {"slurm": SlurmExecutor}
