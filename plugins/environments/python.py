"""Environment ``python``: tool-integrated reasoning. The model runs Python in the sandbox.

One tool, ``python(code)``: the code runs as a script in the code sandbox of the humaneval task
(rlbench/tasks/sandbox.py: bubblewrap, no network, its own process tree, CPU, memory, process
and file limits, killed at ``timeout_s``) and its output (stdout, then stderr, the exit status
when it failed) is the observation. The reward is the task's verifier on the final answer, so
any task with checkable answers (arithmetic, gsm8k, math, a dataset spec) works.

Not covered: state kept between calls (each call is a fresh interpreter); packages outside the
standard library.
"""
from __future__ import annotations

from dataclasses import dataclass

import rlbench


@rlbench.hookimpl
def rlbench_environments():
    return {"python": "rlbench.plugins.environments.python:PythonEnv"}


@dataclass
class PythonConfig:
    timeout_s: float = 5.0  # per program (the sandbox kills it)
    memory_mb: int = 512
    sandbox_allow_weak: bool = False  # run without bubblewrap (rlimits only; network reachable)

    def validate(self):
        if self.timeout_s <= 0 or self.memory_mb < 64:
            raise ValueError("timeout_s must be > 0 and memory_mb >= 64")


class PythonEnv:
    Config = PythonConfig

    def __init__(self, options: PythonConfig, task=None):
        from rlbench.tasks import sandbox

        self.options = options
        self.level = sandbox.require(options.sandbox_allow_weak)["level"]

    def reset(self, **row) -> None:
        return None  # the task's prompt, with the tool listed

    def python(self, code: str) -> str:
        """Run Python code and return what it prints.

        Args:
            code: a Python program; use print() to see values
        """
        from rlbench.tasks import sandbox

        r = sandbox.run_program(code, sandbox.Limits(timeout_s=self.options.timeout_s, memory_mb=self.options.memory_mb),
                                level=self.level)
        if r.timed_out:
            return (r.stdout + f"\nerror: killed after {self.options.timeout_s:g} s").strip()
        out = r.stdout + (("\n" + r.stderr) if r.stderr else "")
        if r.returncode:
            out += f"\n(exit status {r.returncode})"
        return out.strip() or "(no output)"
