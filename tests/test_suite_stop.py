"""How long a stopped suite waits for a run to checkpoint: its own step time (a multi-turn step
takes minutes on a CPU, past any fixed wait), with real processes on the local executor."""
import json
import sys
import time

from rlbench.plugins.executors.local import LocalConfig, LocalExecutor
from rlbench.suites import jobs, suite
from rlbench.suites.status import Status


def test_stop_grace_is_the_runs_longest_step_and_evaluation_plus_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert suite.stop_grace(run) == 0.0  # nothing logged yet: the executor's default wait
    lines = [{"step": 1, "time_spent/wall_seconds": 30.0}, {"step": 2, "time_spent/wall_seconds": 200.0},
             {"step": 3, "time_spent/wall_seconds": 260.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + '\n{"step": 4, "time_sp')
    assert suite.stop_grace(run) == 1.5 * 170.0 + 60.0  # steps of 30, 170, 60 s; a line cut by a kill skipped
    (run / "eval.jsonl").write_text(json.dumps({"step": 0, "time": 40.0}) + "\n" + json.dumps({"step": 3, "time": 90.0}))
    assert suite.stop_grace(run) == 1.5 * (170.0 + 90.0) + 60.0


class _SlowToStop(jobs.Job):
    """A process that, like a run, ends by itself a while after SIGTERM (its step and checkpoint)."""

    def command(self, *a, **k):
        return [sys.executable, "-c", "import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(3), sys.exit(0)))\n"
                "open(sys.argv[1], 'w').close()\n"
                "while True: time.sleep(0.1)", str(self.run_dir / "started")]


def _stop(tmp_path, grace: float) -> tuple[dict, dict, float]:
    executor = LocalExecutor(LocalConfig(), tmp_path)
    job = _SlowToStop("r", [], tmp_path, tmp_path / "r.log")
    jid = executor.submit(job)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    status = Status(tmp_path / "status.json")
    runs = jobs.RunCallbacks(make_job=lambda n: job, finish=lambda n: "resume", tail=lambda n: "",
                             grace=lambda n: grace)
    t = time.monotonic()
    results = jobs.stop_all({"r": jid}, executor, status, runs, "a test", 1.0, echo=lambda *a: None)
    return results, status.get("r"), time.monotonic() - t


def test_a_stop_waits_for_the_runs_own_grace_before_killing_it(tmp_path):
    results, st, took = _stop(tmp_path, grace=30.0)  # the run needs 3 s; the default wait is 1 s
    assert results == {"r": "interrupted"} and st["state"] == "done"  # it ended by itself: its checkpoint
    assert "resumes it from its newest checkpoint" in st["error"]
    assert 2.5 < took < 30.0


def test_a_run_that_outlasts_its_grace_is_killed(tmp_path):
    results, st, took = _stop(tmp_path, grace=0.0)  # no step logged: the default 1 s
    assert results == {"r": "interrupted"} and st["state"] == "killed"
    assert "did not stop within 1 s and was killed" in st["error"]
    assert took < 2.5
