"""The sandbox's uids: each running program holds one uid that no other program on this machine
holds, and the whole process tree of a program is killed by that uid.

A uid is leased with an exclusive ``flock`` on a lease file (one per uid, under the temp dir),
held from before the program starts until its processes are gone. Several Python processes
sandbox programs at once — a suite's ``--jobs``, the ranks of a data-parallel run, test workers —
and without the lease two of them would pick the same uid: one program's RLIMIT_NPROC budget
would count the other's processes, and killing one program's leftovers would kill the other.

The lease matters where the sandbox drops to the uid, i.e. when running as root; it is taken in
every case so the code path is the same.

Not covered: real accounts in 61000-61999 (none on the machines this was built for), and a
machine without ``/tmp`` where processes see different temp dirs.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

UID_BASE = 61000  # 61000-61999: one per concurrent program (never a real account here)
UIDS = 1000
_next = itertools.count()


def _lease_dir() -> Path:
    # one place for the whole machine: /tmp, not $TMPDIR, which differs between shells and tests
    d = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / f"rlbench-sandbox-uids-{os.geteuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def try_lease(uid: int) -> int | None:
    """Lease exactly ``uid`` if no one holds it: the lease file's descriptor (close it to give the
    uid back), else None."""
    fd = os.open(_lease_dir() / str(uid), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def lease():
    """A uid no other sandboxed program holds, for the duration of the ``with`` block."""
    start = next(_next)
    for i in range(UIDS):
        uid = UID_BASE + (start + i) % UIDS
        fd = try_lease(uid)
        if fd is not None:
            break
    else:
        raise RuntimeError(f"all {UIDS} sandbox uids are in use")
    try:
        yield uid
    finally:
        os.close(fd)


def pids_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except FileNotFoundError:
                pass
    return pids


def kill(proc: subprocess.Popen, uid: int) -> None:
    """SIGKILL the sandbox, then every process still running as its uid, until none is left
    (a pid namespace's teardown is asynchronous: a fork bomb's children take a moment to go)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    if os.geteuid() != 0:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pids = pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
