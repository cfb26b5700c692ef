"""Suites on real clusters: a single-node Slurm cluster (slurmctld + slurmd + munged, configured
here on localhost) and a local Ray cluster (``ray start --head`` on loopback, 2 CPUs).

Each runs a small suite with the smoke settings (a task the tiny model learns, hf engine) through
its executor and checks: every run completes as a job of that scheduler, status.json holds the
job ids, the accuracies and rewards equal a local run's (same seeds); a controller killed while
its jobs run re-attaches to them (no duplicate job), jobs cancelled part-way resume from their
checkpoints and no step is done twice; on Slurm, a job stopped by its time limit resumes from its
checkpoint, and a 2-process run placed as 2 Slurm tasks matches 1 process.

Skipped when Slurm (Debian: slurm-wlm, munge) or Ray (``.[ray]``) is missing, unless
RLBENCH_REQUIRE_CLUSTERS=1 (CI: .ci/run installs both) makes a missing one a failure."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlbench import rundir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REQUIRE = bool(os.environ.get("RLBENCH_REQUIRE_CLUSTERS"))
SETTINGS = """base: {base}
budget: {{steps: {steps}}}
matrix: {{algorithm: [grpo, rloo], task: [first_char], seed: [0]}}
set: ["model.tiny_init_std=0.3", "rollout.max_tokens=4", "eval.n=8", "eval.max_tokens=4", "train.lr=1.0e-2",
      "train.checkpoint_every=1", "logging.loggers=[]"]
probe: false
"""


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "RLBENCH_PLUGINS": ",".join(filter(None, ["rlbench_testing_plugins", os.environ.get("RLBENCH_PLUGINS")])),
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **extra}


def _cli(*args, env, timeout=900, **kw):
    return subprocess.run([sys.executable, "-m", "rlbench.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def _missing(what: str):
    if REQUIRE:
        pytest.fail(f"{what} (RLBENCH_REQUIRE_CLUSTERS is set)")
    pytest.skip(what)


def _ports_below_ephemeral(n: int) -> list[int]:
    """``n`` distinct TCP ports free on every address, drawn from 7000-9999: below the kernel's
    ephemeral range (32768+), where no outgoing connection can take one between this check and
    the daemon's bind, and apart from the ports the Slurm jobs' accelerate launches use
    (20000+) and Ray's worker ports (10002+)."""
    out: list[int] = []
    while len(out) < n:
        port = random.randrange(7000, 10000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        if port not in out:
            out.append(port)
    return out


def _suite(path: Path, name: str, steps: int, executor: str = "") -> Path:
    path.write_text(f"name: {name}\n" + SETTINGS.format(base=ROOT / "configs/smoke.yaml", steps=steps) + executor)
    return path


def _wait(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _status(root: Path) -> dict:
    return json.loads((root / "status.json").read_text())["runs"] if (root / "status.json").is_file() else {}


def _results(root: Path) -> dict:
    """Per run: the held-out accuracies and the per-step rewards."""
    out = {}
    for d in sorted((root / "runs").iterdir()):
        if d.name.startswith("."):
            continue
        out[d.name] = ([e["accuracy"] for e in rundir.read_jsonl(d / "eval.jsonl")],
                       [m["reward/mean"] for m in rundir.read_jsonl(d / "metrics.jsonl")])
    return out


def _steps_once(root: Path, steps: int) -> None:
    for d in (root / "runs").iterdir():
        if not d.name.startswith("."):
            assert [m["step"] for m in rundir.read_jsonl(d / "metrics.jsonl")] == list(range(1, steps + 1)), d.name


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The reference: the same suite on the local executor."""
    tmp = tmp_path_factory.mktemp("local")
    spec = _suite(tmp / "s.yaml", "ref", 6)
    r = _cli("suite", "run", str(spec), "--out", str(tmp), "--jobs", "2", env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    res = _results(tmp / "ref")
    assert any(len(set(acc)) > 1 or len(set(rew)) > 1 for acc, rew in res.values())  # the runs learn something
    return res


# -- the hook -----------------------------------------------------------------------------------

def test_hook_rlbench_executors(tmp_path):
    """A third-party executor, registered at run time, runs a suite's jobs; the suite's loop does
    the rest (job ids in status.json, a failed job retried up to max_attempts)."""
    import dataclasses

    import rlbench
    from rlbench import manager
    from rlbench.suites import suite

    @dataclasses.dataclass
    class InlineConfig:
        tag: str = "x"

    class Inline:  # runs each job to the end inside submit()
        Config, name, parallel = InlineConfig, "inline", 1

        def __init__(self, config, root):
            self.config, self.n = config, 0

        def submit(self, job):
            self.n += 1
            with open(job.log, "a") as f:
                subprocess.run(job.command(), stdout=f, stderr=subprocess.STDOUT, env=_env(), check=False)
            return f"{self.config.tag}-{self.n}"

        def poll(self, ids):
            return {i: "done" for i in ids}

        def cancel(self, ids):
            pass

        def note(self, jid):
            return "inline jobs leave no trace"

    class Plugin:
        @rlbench.hookimpl
        def rlbench_executors(self):
            return {"inline": Inline}

    spec = _suite(tmp_path / "s.yaml", "hook", 1, "executor: {name: inline, tag: t, max_attempts: 2}\n")
    spec.write_text(spec.read_text().replace("[grpo, rloo]", "[grpo, not_an_algorithm_but_a_typo]").replace(
        "task: [first_char]", "task: [arithmetic]"))
    with manager.registered(Plugin()):
        assert "inline" in {e.name for e in manager.entries("executor")}
        with pytest.raises(Exception, match="unknown algorithm 'not_an_algorithm_but_a_typo'"):
            suite.run_suite(spec, tmp_path / "out", echo=lambda m: None)  # a bad config fails before any job
        (tmp_path / "broken.jsonl").write_text('{"question": "1+1?"}\n')  # no answer: the runs fail
        spec.write_text(spec.read_text().replace("not_an_algorithm_but_a_typo", "rloo").replace(
            "task: [arithmetic]", f"task: [{{name: gsm8k, test_file: {tmp_path / 'broken.jsonl'}}}]"))
        (tmp_path / "out").exists() and shutil.rmtree(tmp_path / "out")
        summary = suite.run_suite(spec, tmp_path / "out", echo=lambda m: None)
    st = json.loads((tmp_path / "out" / "hook" / "status.json").read_text())
    assert st["executor"] == {"name": "inline", "tag": "t"}
    # every run fails; each was tried twice, its log's end and the executor's note in its error
    assert summary["failed"] == 2 and all(len(v["job_ids"]) == 2 for v in st["runs"].values())
    assert all(v["job_ids"][0].startswith("t-") and "inline jobs leave no trace" in v["error"]
               and "missing answer" in v["error"] for v in st["runs"].values())


# -- Slurm --------------------------------------------------------------------------------------

def _kill_pidfiles(*files: Path) -> None:
    """Stop the daemons named by these pid files (a stale file of a daemon that already died is
    skipped: its pid may belong to another process by now)."""
    pids = []
    for f in files:
        try:
            pid = int(f.read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() in ("slurmctld", "slurmd", "munged"):
                pids.append(pid)
        except (OSError, ValueError):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if pids:
            time.sleep(2)


def _slurm_conf(d: Path, sock: Path, ctld_port: int, slurmd_port: int) -> str:
    """A one-node cluster on localhost. Besides the defaults: a requeued job may start again
    after 10 s (``cred_expire``, default 120 s) and the schedulers look at pending jobs every 2 s
    (``sched_interval`` 60 s, ``bf_interval`` 30 s by default), so the time-limit test does not
    wait minutes for the requeued job."""
    host = socket.gethostname()
    return f"""ClusterName=rlbenchtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log/slurmctld.log'}
SlurmdLogFile={d / 'log/slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
KillWait=20
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue")):
        _missing("Slurm is not installed (apt-get install slurm-wlm munge)")
    pytest.importorskip("submitit") if not REQUIRE else __import__("submitit")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir()
    (d / "munge").chmod(0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = d / "munge" / "munge.socket"
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d / 'munge/pid'}",
                    f"--log-file={d / 'munge/log'}", f"--seed-file={d / 'munge/seed'}"], check=True)
    conf = d / "slurm.conf"
    env = _env(SLURM_CONF=str(conf))
    daemons = (d / "slurmctld.pid", d / "slurmd.pid")

    def sinfo_idle():
        return "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout

    def ctld_up():
        return "is UP" in subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True).stdout

    # CI once saw slurmctld die with "Address already in use" on a port that was free a moment
    # before: the ports come from below the ephemeral range, slurmd starts only once slurmctld
    # answers (the two can never race for one port), and a failed start is retried on new ports
    logs = []
    for attempt in range(3):
        conf.write_text(_slurm_conf(d, sock, *_ports_below_ephemeral(2)))
        try:
            subprocess.run(["slurmctld", "-c"], env=env, check=True)
            _wait(ctld_up, 60, "slurmctld to answer")
            subprocess.run(["slurmd", "-c"], env=env, check=True)
            _wait(sinfo_idle, 60, "slurmd to register")
            break
        except (AssertionError, subprocess.CalledProcessError) as e:
            log = d / "log" / "slurmctld.log"
            logs.append(f"attempt {attempt + 1}: {e}; slurmctld.log ends: "
                        + (log.read_text()[-1500:] if log.exists() else "(no log)"))
            _kill_pidfiles(*daemons)
    else:
        _kill_pidfiles(d / "munge" / "pid")
        _missing("Slurm did not start here:\n" + "\n".join(logs))
    yield env
    subprocess.run(["scancel", "--me"], env=env)
    subprocess.run(["scontrol", "shutdown"], env=env)
    _kill_pidfiles(*daemons, d / "munge" / "pid")


SLURM = "executor: {name: slurm, time_limit_min: 30, cpus_per_task: 1, poll_seconds: 1}\n"


def test_slurm_suite_reattaches_cancels_resumes_and_matches_local(slurm, local, tmp_path):
    spec = _suite(tmp_path / "s.yaml", "ref", 6, SLURM)
    root = tmp_path / "out" / "ref"
    cmd = [sys.executable, "-m", "rlbench.cli", "suite", "run", str(spec), "--out", str(tmp_path / "out"), "--executor", "slurm"]

    def controller(log):
        return subprocess.Popen(cmd, cwd=ROOT, env=slurm, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                                start_new_session=True)

    a = controller(tmp_path / "a.log")  # submits both jobs; killed while they run
    first = _wait(lambda: (s := _status(root)) and len(s) == 2 and all(v.get("job_id") for v in s.values()) and s,
                  120, "both jobs submitted")
    ids = {k: v["job_id"] for k, v in first.items()}
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    b = controller(tmp_path / "b.log")  # re-attaches to the jobs still queued or running
    _wait(lambda: "re-attached" in (tmp_path / "b.log").read_text(), 60, "the second controller to re-attach")
    _wait(lambda: any(root.glob("runs/*/checkpoints/step_*/state.json")), 300, "a checkpoint")
    os.killpg(b.pid, signal.SIGKILL)
    b.wait()
    assert {k: v["job_ids"] for k, v in _status(root).items()} == {k: [j] for k, j in ids.items()}  # no duplicate
    r = _cli("suite", "cancel", str(root), env=slurm)  # scancel part-way
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stdout + r.stderr
    _wait(lambda: not subprocess.run(["squeue", "-h", "--me"], env=slurm, capture_output=True, text=True).stdout.strip(),
          60, "the cancelled jobs to leave the queue")
    r = _cli("suite", "run", str(spec), "--out", str(tmp_path / "out"), "--executor", "slurm", env=slurm)
    assert r.returncode == 0, r.stderr[-3000:]
    st = _status(root)
    assert all(v["status"] == "complete" for v in st.values())
    assert all(v["job_id"].isdigit() and (root / "slurm" / v["job_id"]).is_dir() for v in st.values())  # through sbatch
    # runs cancelled before they finished were resumed, not redone: every step once
    _steps_once(root, 6)
    resumed = [k for k, v in st.items() if len(v["job_ids"]) > 1]
    assert all(st[k]["how"] == "resumed" for k in resumed)
    assert json.loads((root / "status.json").read_text())["executor"]["name"] == "slurm"
    assert _results(root) == local  # the same accuracies and rewards as the local executor's runs
    s = _cli("suite", "status", str(root), env=slurm)
    assert all(v["job_id"] in s.stdout for v in st.values())


@pytest.mark.slow  # about 4 minutes: it waits out a real Slurm time limit and the requeue
def test_slurm_time_limit_requeues_and_resumes(slurm, tmp_path):
    # 2 minutes per job and 50 steps of at least 2 s: no job can finish the run. SIGUSR2 30 s
    # before the limit (Slurm may send it up to 60 s earlier): the run checkpoints and submitit
    # requeues the job (the same job id); where Slurm's time limit strikes first, its SIGTERM makes
    # the run checkpoint and the suite resumes it in a new job
    spec = tmp_path / "t.yaml"
    spec.write_text(f"name: tl\nbase: {ROOT / 'configs/smoke.yaml'}\nbudget: {{steps: 50}}\n"
                    "matrix: {algorithm: [grpo], seed: [0]}\n"
                    'set: ["rollout.max_tokens=4", "eval.n=4", "eval.max_tokens=4", "train.checkpoint_every=1", '
                    '"logging.loggers=[]", "eval.before=false"]\nprobe: false\n'
                    "executor: {name: slurm, time_limit_min: 2, signal_delay_s: 30, cpus_per_task: 1, poll_seconds: 1}\n")
    r = _cli("suite", "run", str(spec), "--out", str(tmp_path), env={**slurm, "RLBENCH_TEST_STEP_SECONDS": "2"},
             timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "tl" / "runs" / "grpo-arithmetic-s0"
    log = (tmp_path / "tl" / "logs" / "grpo-arithmetic-s0.log").read_text()
    assert "received: stopped after step" in log and "--resume" in log  # stopped by the limit, then resumed
    assert [m["step"] for m in rundir.read_jsonl(run / "metrics.jsonl")] == list(range(1, 51))


def test_slurm_places_a_two_process_run_as_two_tasks(slurm, tmp_path):
    one = _suite(tmp_path / "one.yaml", "one", 3)
    two = _suite(tmp_path / "two.yaml", "two", 3,
                 "executor: {name: slurm, tasks_per_node: 2, processes: 1, cpus_per_task: 1, poll_seconds: 1}\n")
    for spec in (one, two):
        spec.write_text(spec.read_text().replace("[grpo, rloo]", "[grpo]").replace(
            '"logging.loggers=[]"', '"logging.loggers=[]", "rollout.batch_invariant_sampling=true"'))
    assert _cli("suite", "run", str(one), "--out", str(tmp_path), env=_env()).returncode == 0
    r = _cli("suite", "run", str(two), "--out", str(tmp_path), env=slurm)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "two" / "logs" / "grpo-first_char-s0.log").read_text()
    assert "task 0/2" in log and "task 1/2" in log  # two Slurm tasks, one accelerate machine each
    a = rundir.read_jsonl(tmp_path / "one" / "runs" / "grpo-first_char-s0" / "metrics.jsonl")
    b = rundir.read_jsonl(tmp_path / "two" / "runs" / "grpo-first_char-s0" / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3] and all(m["dist/world_size"] == 2.0 for m in b)
    for x, y in zip(a, b):
        assert x["reward/mean"] == y["reward/mean"]
        for k in ("loss", "grad_norm"):
            assert abs(x[k] - y[k]) <= max(1e-7, 2e-5 * max(abs(x[k]), abs(y[k]))), (k, x[k], y[k])


# -- Ray ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    if shutil.which("ray") is None and not Path(sys.executable).with_name("ray").exists():
        _missing("Ray is not installed (pip install -e '.[ray]')")
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    port, dash = _ports_below_ephemeral(2)
    env = _env(RAY_JOB_STOP_SIGNAL_TIMEOUT_S="60")  # stop_job: SIGTERM, time to write a checkpoint
    r = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
                        "--disable-usage-stats", "--include-dashboard", "true"], env=env, capture_output=True,
                       text=True, timeout=180)
    if r.returncode != 0:
        _missing(f"ray start failed: {r.stderr[-1500:]}")
    yield env, f"http://127.0.0.1:{dash}"
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_suite_reattaches_cancels_resumes_and_matches_local(ray_cluster, local, tmp_path):
    env, address = ray_cluster
    spec = _suite(tmp_path / "s.yaml", "ref", 6, f"executor: {{name: ray, address: '{address}', cpus: 1, poll_seconds: 1}}\n")
    root = tmp_path / "out" / "ref"
    cmd = [sys.executable, "-m", "rlbench.cli", "suite", "run", str(spec), "--out", str(tmp_path / "out"), "--executor", "ray"]
    a = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "a.log", "w"),
                         start_new_session=True)
    first = _wait(lambda: (s := _status(root)) and len(s) == 2 and all(v.get("job_id") for v in s.values()) and s,
                  120, "both jobs submitted")
    os.killpg(a.pid, signal.SIGKILL)  # the controller dies; Ray jobs outlive it
    a.wait()
    b = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "b.log", "w"),
                         start_new_session=True)
    _wait(lambda: "re-attached" in (tmp_path / "b.log").read_text() or b.poll() is not None, 120, "re-attaching")
    _wait(lambda: any(root.glob("runs/*/checkpoints/step_*/state.json")) or b.poll() is not None, 300, "a checkpoint")
    os.killpg(b.pid, signal.SIGKILL)
    b.wait()
    assert "re-attached" in (tmp_path / "b.log").read_text()
    assert {k: v["job_ids"] for k, v in _status(root).items()} == {k: [v["job_id"]] for k, v in first.items()}
    r = _cli("suite", "cancel", str(root), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _cli("suite", "run", str(spec), "--out", str(tmp_path / "out"), "--executor", "ray", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    st = _status(root)
    assert all(v["status"] == "complete" and v["job_id"].startswith("rlbench-") for v in st.values())
    _steps_once(root, 6)
    assert _results(root) == local
