"""The Ray executor: each run is one Ray job, submitted through Ray's job submission API.

A Ray job outlives the process that submitted it (unlike a Ray task, owned by its driver), so a
suite controller that is killed and started again re-attaches to its jobs by their submission ids
(``JobSubmissionClient.get_job_status``); ``cancel`` stops them (``stop_job``: SIGTERM, so the run
finishes its step and writes a checkpoint). The job's entrypoint reserves ``cpus`` / ``gpus`` /
``memory_gb`` / ``resources`` and appends the run's output to its log in the suite directory.

A run with ``processes`` > 1 is placed by a placement group (``python -m
rlbench.plugins.executors.ray launch``, the job's entrypoint): one bundle per process, spread
over the cluster's nodes by ``strategy``; each bundle runs ``accelerate launch`` as one machine
of the run (``--machine_rank`` = its bundle, ``--main_process_ip`` = bundle 0's node).

Requires the suite directory on a file system every Ray node sees, and the same Python
environment on every node (the entrypoint is this controller's interpreter).

Not covered: Ray's runtime environments for shipping code (``working_dir``), autoscaling.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import rlbench

STATES = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "done", "FAILED": "done", "STOPPED": "done"}


@dataclass
class RayConfig:
    address: str = "http://127.0.0.1:8265"  # the cluster's dashboard (job submission) address
    cpus: float = 1.0  # per process
    gpus: float = 0.0  # per process
    memory_gb: float = 0.0
    resources: dict = field(default_factory=dict)  # custom resources per process, e.g. {H100: 1}
    processes: int = 1  # > 1: a placement group of this many bundles, one accelerate machine each
    strategy: str = "PACK"  # placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    parallel: int = 10_000  # jobs kept submitted at once (Ray queues the rest on resources)

    def validate(self):
        if self.processes < 1 or self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"processes must be >= 1 and cpus, gpus >= 0, got {self.processes}, {self.cpus}, {self.gpus}")
        if self.strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.strategy!r}")


class RayExecutor:
    Config = RayConfig
    name = "ray"
    parallel: int  # jobs kept submitted at once (from the config)

    def __init__(self, config: RayConfig, root: Path):
        self.config, self.root = config, Path(root)
        self.parallel = config.parallel
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.config.address)
        return self._client

    def submit(self, job) -> str:
        c = self.config
        job.log.parent.mkdir(parents=True, exist_ok=True)
        if job.processes * c.processes > 1:  # the entrypoint places the machines itself
            spec = {"args": job.args, "machines": c.processes, "bundle": self._bundle(), "strategy": c.strategy,
                    "log": str(job.log)}
            cmd = [sys.executable, "-m", "rlbench.plugins.executors.ray", "launch", json.dumps(spec)]
            reserve = {}
        else:
            cmd = job.command()
            reserve = dict(entrypoint_num_cpus=c.cpus, entrypoint_num_gpus=c.gpus,
                           **({"entrypoint_memory": int(c.memory_gb * 2**30)} if c.memory_gb else {}),
                           **({"entrypoint_resources": dict(c.resources)} if c.resources else {}))
        entry = f"exec {shlex.join(cmd)} >> {shlex.quote(str(job.log))} 2>&1"
        sid = f"rlbench-{job.name}-{uuid.uuid4().hex[:8]}"
        with open(job.log, "a") as f:
            f.write(f"\n=== ray job {sid} ({job.how}): {' '.join(cmd)}\n")
        return self.client.submit_job(entrypoint=entry, submission_id=sid,
                                      runtime_env={"env_vars": {k: str(v) for k, v in job.env.items()}}, **reserve)

    def _bundle(self) -> dict:
        c = self.config
        b = {"CPU": c.cpus, **({"GPU": c.gpus} if c.gpus else {}), **dict(c.resources)}
        if c.memory_gb:
            b["memory"] = int(c.memory_gb * 2**30)
        return b

    def poll(self, ids) -> dict[str, str]:
        out = {}
        for jid in ids:
            try:
                out[jid] = STATES.get(str(getattr(self.client.get_job_status(jid), "value", "")), "running")
            except RuntimeError:  # unknown to this cluster (a cluster restarted since)
                out[jid] = "gone"
        return out

    def cancel(self, ids) -> None:
        for jid in ids:
            try:
                self.client.stop_job(jid)
            except RuntimeError:
                pass

    def note(self, jid: str) -> str:
        try:
            info = self.client.get_job_info(jid)
        except RuntimeError:
            return "no longer known to the Ray cluster"
        return f"{getattr(info.status, 'value', info.status)}: {info.message or ''}".strip()


def launch(spec: dict) -> int:
    """A multi-process run's entrypoint: a placement group with one bundle per machine, each
    running ``accelerate launch`` as that machine; returns the first non-zero exit code."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rlbench.suites import jobs

    ray.init(address="auto")
    n = spec["machines"]
    pg = placement_group([dict(spec["bundle"])] * n, strategy=spec["strategy"])
    ray.get(pg.ready())
    bundle = {k: v for k, v in spec["bundle"].items() if k not in ("CPU", "GPU", "memory")}
    opts = dict(num_cpus=spec["bundle"].get("CPU", 1), num_gpus=spec["bundle"].get("GPU", 0), resources=bundle or None)

    @ray.remote
    def node_ip() -> str:
        return ray.util.get_node_ip_address()

    @ray.remote
    def machine(rank: int, main_ip: str, port: int) -> int:
        import subprocess

        cmd = jobs.launch_command(spec["args"], 1, n, rank, main_ip, port)
        with open(spec["log"], "a") as f:
            f.write(f"=== machine {rank}/{n} on {ray.util.get_node_ip_address()}: {' '.join(cmd)}\n")
            f.flush()
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ)).returncode

    strategy = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
    main_ip = ray.get(node_ip.options(scheduling_strategy=strategy(0), **opts).remote())
    port = 20000 + uuid.uuid4().int % 20000
    codes = ray.get([machine.options(scheduling_strategy=strategy(i), **opts).remote(i, main_ip, port) for i in range(n)])
    return next((c for c in codes if c), 0)


@rlbench.hookimpl
def rlbench_executors():
    return {"ray": RayExecutor}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "launch":
    sys.exit(launch(json.loads(sys.argv[2])))
