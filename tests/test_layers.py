"""The layout is the architecture: import-linter's contracts (pyproject.toml, [tool.importlinter])
hold on the tree, and a planted upward import breaks them — checked on a copy of the package."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(package_parent: Path = ROOT) -> subprocess.CompletedProcess:
    # run from the folder that holds the package: `python -c` puts it first on sys.path, so that
    # copy of rlbench is the one analysed; the contracts are always the project's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*LINT, "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=package_parent,
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_wings_import_only_downward():
    p = _lint()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 kept, 0 broken" in p.stdout


def test_a_planted_upward_import_breaks_the_contracts(tmp_path):
    copy = tmp_path / "rlbench"
    shutil.copytree(ROOT / "rlbench", copy, ignore=shutil.ignore_patterns("__pycache__", "plugins", "tasks"))
    with open(copy / "training" / "update.py", "a") as f:  # training reaching up into the suites
        f.write("\nfrom rlbench.suites import jobs  # planted\n")
    with open(copy / "reporting" / "stats.py", "a") as f:  # a report that would need the model code
        f.write("\nfrom rlbench.modeling import models  # planted\n")
    p = _lint(tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "0 kept, 2 broken" in out
    assert "rlbench.training.update -> rlbench.suites.jobs" in out
    assert "rlbench.reporting.stats -> rlbench.modeling.models" in out
