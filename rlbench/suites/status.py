"""A suite's ``status.json``: one entry per run (status, executor, job ids, attempts, the reason it
failed or was interrupted) plus suite-level entries (the resolved executor settings, the running
driver's pid and host), written atomically after every change; and what ``rlbench suite status``
and ``suite cancel`` read from it."""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
from pathlib import Path


class Status:
    """``status.json``: one entry per run, written atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.data = json.loads(path.read_text()) if path.exists() else {"runs": {}}

    def set(self, run: str, **fields) -> None:
        with self.lock:
            self.data["runs"].setdefault(run, {}).update(fields)
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def get(self, run: str) -> dict:
        return self.data["runs"].get(run, {})

    def meta(self, **fields) -> None:
        """Suite-level entries (the resolved executor settings)."""
        with self.lock:
            self.data.update(fields)
            self._write()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")



def status_table(root: str | Path) -> list[dict]:
    root = Path(root)
    st = Status(root / "status.json")
    rows = []
    for name, info in sorted(st.data["runs"].items()):
        run_dir = root / "runs" / name
        steps = 0
        if (run_dir / "metrics.jsonl").exists():
            steps = sum(1 for _ in open(run_dir / "metrics.jsonl"))
        rows.append({"run": name, "status": info.get("status"), "steps_logged": steps, "job_id": info.get("job_id"),
                     "state": info.get("state"),
                     "attempts": info.get("attempts", 0), "error": info.get("error") or ""})
    return rows


def driver_alive(driver: dict | None) -> bool:
    """The suite driver recorded in status.json still runs (on this machine)."""
    if not driver or driver.get("host") != socket.gethostname():
        return False
    try:
        cmdline = Path(f"/proc/{driver['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "rlbench" in cmdline and "suite" in cmdline


def status_text(root: str | Path) -> str:
    """``rlbench suite status``: a line per run, the whole reason under a run that did not complete,
    then the counts. FileNotFoundError when the directory holds no suite status."""
    rows = status_table(root)
    if not rows:
        raise FileNotFoundError(f"no suite status under {root} (status.json of `rlbench suite run`)")
    lines, counts = [], {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines.append(f"{r['run']:<40} {r['status']:<11} steps {r['steps_logged']:<5} attempts {r['attempts']} "
                     f"job {r['job_id'] or '-'} ({r['state'] or '-'})")
        if r["error"] and r["status"] != "complete":
            lines.append("    " + r["error"].strip().replace("\n", "\n    "))
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
