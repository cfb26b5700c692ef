"""Run untrusted generated Python: each program in its own sandboxed subprocess.

Isolation (``probe()`` says which level is active; tasks record it in manifest.json):

``bwrap``  bubblewrap namespaces (pid, net, ipc, uts, cgroup): no network but
           loopback, its own process tree, a read-only view of /usr and the
           Python installation, a size-limited private tmpfs as scratch
           directory (``/tmp``, also the working directory), nothing else
           writable. Inside, the program runs as an unprivileged uid (root's
           RLIMIT_NPROC is not enforced, and these machines run as root), each
           concurrent program on the machine with its own uid (a lease, see
           ``_sandbox_uids.py``) so process budgets and kills are separate,
           with CPU, address-space, process-count and file-size limits. The
           whole tree is killed at the wall-clock limit (SIGKILL to bwrap ends
           the pid namespace, and every process in it).
``weak``   no bubblewrap: the same rlimits and uid drop (when root) in a
           private scratch directory, but the network is reachable and the
           rest of the file system is as writable as for uid ``nobody``.
           Refused unless the caller passes ``allow_weak=True``.

Verdicts are taken on the trusted side (``check_function``): the program is
loaded inside the sandbox by a small server (``_sandbox_server.py``) that only
answers calls of the entry point; the tests run outside, in the caller, against
a proxy whose return values are decoded as plain data (int, float, str, list,
tuple, dict, set, bytes, bool, None). A program cannot forge a pass by exiting
early (no answer is a failure), by returning an object whose ``__eq__`` always
says True (only plain data crosses), or by reaching into the test harness's
frames (they are in another process).

Not covered: tests that need the program's own objects (classes, generators,
callables passed back and forth) or in-place mutation of arguments; programs
that need packages outside the standard library (``-I -S``: no site-packages).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rlbench.tasks import _sandbox_uids as _uids
from rlbench.tasks._sandbox_codec import CodecError, decode, encode  # noqa: F401 - re-exported
from rlbench.tasks._sandbox_uids import UID_BASE, kill as _kill  # noqa: F401 - UID_BASE re-exported

SERVER = Path(__file__).with_name("_sandbox_server.py")
CODEC = Path(__file__).with_name("_sandbox_codec.py")
MAX_MESSAGE = 32 * 2**20  # bytes: a larger answer is a failure, not a memory problem for the trainer


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock for the whole program (load + every test call)
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_procs: int = 64  # processes of the sandbox's uid (RLIMIT_NPROC)
    max_file_mb: int = 16  # largest file a program may write (RLIMIT_FSIZE)
    scratch_mb: int = 64  # size of the private tmpfs scratch directory (bwrap only)
    cpu_s: int = 0  # RLIMIT_CPU; 0 = timeout_s rounded up + 1


@dataclass
class RunResult:
    returncode: int | None  # None when killed at the time limit
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float


@dataclass
class Verdict:
    passed: bool
    reason: str  # "passed", "timeout", "load_error: …", "assertion", "crashed", …
    wall_s: float


class SandboxError(RuntimeError):
    pass


# -- isolation level -------------------------------------------------------------------------

def _python() -> str:
    return os.path.realpath(sys.executable)


def _ro_binds() -> list[str]:
    """Read-only views of the system and the Python installation (symlinked layouts included)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    prefixes = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(_python()))}
    for p in sorted(prefixes):
        if not p.startswith("/usr"):
            parents = [str(a) for a in reversed(Path(p).parents) if str(a) != "/"]
            for a in parents:  # bwrap would create them 0700, unreadable to the sandbox's uid
                args += ["--perms", "0755", "--dir", a]
            args += ["--ro-bind", p, p]
    if os.path.isdir("/etc/alternatives"):
        args += ["--ro-bind", "/etc/alternatives", "/etc/alternatives"]
    return args


def _command(argv: list[str], scratch: Path, limits: Limits, uid: int, level: str) -> list[str]:
    cpu = limits.cpu_s or int(limits.timeout_s) + 1
    rl = ["prlimit", f"--as={limits.memory_mb * 2**20}", f"--nproc={limits.max_procs}",
          f"--fsize={limits.max_file_mb * 2**20}", f"--cpu={cpu}", "--core=0", "--"]
    drop = []
    if os.geteuid() == 0:
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]
    if level == "bwrap":
        return ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", *_ro_binds(), "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(limits.scratch_mb * 2**20), "--tmpfs", "/tmp",
                "--ro-bind", str(scratch), "/sandbox", "--chdir", "/tmp", "--setenv", "HOME", "/tmp",
                "--setenv", "PATH", "/usr/bin:/bin", "--", *drop, *rl, *argv]
    return [*drop, *rl, *argv]


@lru_cache(maxsize=1)
def probe() -> dict:
    """Which isolation works here: runs a probe program under bubblewrap and reports
    ``{"level": "bwrap" | "weak", "network_isolated", "uid", "detail"}``."""
    info = {"level": "weak", "network_isolated": False, "uid": os.geteuid(), "detail": ""}
    if not (shutil.which("bwrap") and shutil.which("prlimit")):
        info["detail"] = "bwrap (Debian/Ubuntu package bubblewrap) or prlimit not found"
        return info
    code = ("import os, socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1); net = 1\n"
            "except OSError:\n    net = 0\nprint(os.getuid(), net)\n")
    try:
        r = run_program(code, Limits(timeout_s=20), level="bwrap")
        uid, net = (int(x) for x in r.stdout.split())
    except Exception as e:  # noqa: BLE001 - any failure means bwrap is unusable here
        info["detail"] = f"bwrap probe failed: {e}"
        return info
    if r.returncode != 0 or net:
        info["detail"] = f"bwrap probe: exit {r.returncode}, network reachable={bool(net)}, stderr={r.stderr[-300:]}"
        return info
    return {"level": "bwrap", "network_isolated": True, "uid": uid, "detail": "bubblewrap namespaces, unprivileged uid"}


def require(allow_weak: bool) -> dict:
    """The active isolation, or a SandboxError when it is weak and the user did not accept that."""
    info = probe()
    if info["level"] != "bwrap" and not allow_weak:
        raise SandboxError(
            f"refusing to run generated code without isolation ({info['detail']}). Install bubblewrap "
            f"(apt-get install bubblewrap), or accept weak isolation (rlimits and an unprivileged uid, but "
            f"network and file system reachable) with task option sandbox_allow_weak: true")
    return info


# -- running a program -------------------------------------------------------------------------

def _new_scratch(files: dict[str, str]) -> Path:
    d = Path(tempfile.mkdtemp(prefix="rlbench-sbx-"))
    for name, text in files.items():
        (d / name).write_text(text)
        (d / name).chmod(0o644)
    d.chmod(0o755)
    return d


def run_program(code: str, limits: Limits | None = None, stdin: str = "", level: str | None = None) -> RunResult:
    """Run ``code`` as a script in a fresh sandbox; stdout/stderr are captured (last 64 kB)."""
    limits = limits or Limits()
    level = level or probe()["level"]
    scratch = _new_scratch({"program.py": code})
    workdir = scratch if level == "bwrap" else Path(tempfile.mkdtemp(prefix="rlbench-sbx-work-"))
    if level != "bwrap":
        workdir.chmod(0o777)
    path = "/sandbox/program.py" if level == "bwrap" else str(scratch / "program.py")
    held = contextlib.ExitStack()  # the uid's lease, given back once the program's processes are gone
    t = time.perf_counter()
    try:
        uid = held.enter_context(_uids.lease())
        cmd = _command([_python(), "-I", "-S", path], scratch, limits, uid, level)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)})
        try:
            out, err = proc.communicate(stdin.encode(), timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(proc, uid)
            out, err = proc.communicate()
            timed_out = True
        _kill(proc, uid)  # children left behind by a program that exited
        return RunResult(None if timed_out else proc.returncode, out[-65536:].decode(errors="replace"),
                         err[-65536:].decode(errors="replace"), timed_out, time.perf_counter() - t)
    finally:
        held.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if workdir != scratch:
            shutil.rmtree(workdir, ignore_errors=True)


# -- plain data only crosses: see _sandbox_codec.py ------------------------------------------

def _send(fd: int, obj, deadline: float) -> None:
    """Length-prefixed JSON; the fd is non-blocking, so a program that stops reading cannot stall us."""
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack(">Q", len(data)) + data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        _, ready, _ = select.select([], [fd], [], left)
        if not ready:
            raise TimeoutError
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: float) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None  # the program is gone
        buf += chunk
    return bytes(buf)


def _recv(fd: int, deadline: float):
    head = _read_exact(fd, 8, deadline)
    if head is None:
        return None
    (n,) = struct.unpack(">Q", head)
    if n > MAX_MESSAGE:
        raise CodecError(f"answer of {n} bytes is too large")
    body = _read_exact(fd, n, deadline)
    if body is None:
        return None
    return json.loads(body)


class CandidateGone(Exception):
    """The program exited or was killed before answering."""


class CandidateRaised(Exception):
    """The entry point raised; the message names the exception."""


class _Proxy:
    def __init__(self, wfd: int, rfd: int, deadline: float):
        self.wfd, self.rfd, self.deadline = wfd, rfd, deadline

    def __call__(self, *args, **kwargs):
        try:
            _send(self.wfd, [encode(list(args)), encode(kwargs)], self.deadline)
        except (BrokenPipeError, ConnectionError):
            raise CandidateGone("the program is gone") from None
        msg = _recv(self.rfd, self.deadline)
        if msg is None:
            raise CandidateGone("the program exited before answering")
        if not (isinstance(msg, list) and len(msg) == 2):
            raise CodecError("malformed answer")
        kind, payload = msg
        if kind == "ok":
            return decode(payload)
        raise CandidateRaised(str(payload)[:300])


def check_function(program: str, entry_point: str, tests: str, *, check_name: str = "check",
                   trusted_prelude: str = "", limits: Limits | None = None, level: str | None = None) -> Verdict:
    """Load ``program`` in a sandbox and run ``tests`` (trusted code defining ``check(candidate)``)
    here, calling the sandboxed ``entry_point`` through a plain-data proxy. ``trusted_prelude``
    (e.g. HumanEval's prompt, whose helpers the tests use) runs here before the tests."""
    limits = limits or Limits()
    level = level or probe()["level"]
    t0 = time.perf_counter()
    deadline = time.monotonic() + limits.timeout_s
    scratch = _new_scratch({"program.py": program, "server.py": SERVER.read_text(),
                            "_sandbox_codec.py": CODEC.read_text()})
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    root = "/sandbox" if level == "bwrap" else str(scratch)
    argv = [_python(), "-I", "-S", f"{root}/server.py", f"{root}/program.py", entry_point, str(req_r), str(resp_w)]
    workdir = scratch if level == "bwrap" else Path(tempfile.mkdtemp(prefix="rlbench-sbx-work-"))
    if level != "bwrap":
        workdir.chmod(0o777)
    proc = None
    held = contextlib.ExitStack()  # the uid's lease, given back once the program's processes are gone

    def verdict(passed: bool, reason: str) -> Verdict:
        return Verdict(passed, reason, time.perf_counter() - t0)

    try:
        uid = held.enter_context(_uids.lease())
        proc = subprocess.Popen(_command(argv, scratch, limits, uid, level), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(req_r, resp_w),
                                cwd=workdir, start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)})
        os.close(req_r)
        os.close(resp_w)
        req_r = resp_w = -1
        os.set_blocking(req_w, False)
        try:
            hello = _recv(resp_r, deadline)
        except TimeoutError:
            return verdict(False, "timeout")
        if hello is None:
            return verdict(False, "crashed: exited while loading")
        if hello != ["ready"]:
            return verdict(False, f"load_error: {str(hello[1] if isinstance(hello, list) and len(hello) > 1 else hello)[:300]}")
        ns: dict = {"__name__": "__rlbench_tests__"}
        try:
            exec(compile(trusted_prelude + "\n" + tests, "<tests>", "exec"), ns)  # noqa: S102 - dataset tests, trusted
            proxy = _Proxy(req_w, resp_r, deadline)
            ns[entry_point] = proxy  # tests that call the function by name (HumanEval/33) get the program's
            ns[check_name](proxy)
        except TimeoutError:
            return verdict(False, "timeout")
        except AssertionError:
            return verdict(False, "assertion")
        except CandidateGone as e:
            return verdict(False, f"crashed: {e}")
        except CandidateRaised as e:
            return verdict(False, f"raised: {e}")
        except CodecError as e:
            return verdict(False, f"bad answer: {e}")
        except Exception as e:  # noqa: BLE001 - a test failing for any other reason is a failure
            return verdict(False, f"error: {type(e).__name__}: {str(e)[:200]}")
        return verdict(True, "passed")
    finally:
        for fd in (req_r, req_w, resp_r, resp_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if proc is not None:
            _kill(proc, uid)
        held.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if workdir != scratch:
            shutil.rmtree(workdir, ignore_errors=True)
