"""The built wheel carries what an installed rlbench needs outside a checkout: the price table of
cost.json and the tasks' vendored data."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_price_table_and_task_data(tmp_path):
    # built from a clean copy: a checkout's egg-info would list files the package data does not declare
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "runs", "__pycache__",
                                                             ".pytest_cache", ".hypothesis", "wandb"))  # written by tests beside it
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("rlbench-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert "rlbench/prices.yaml" in names
    assert any(n.startswith("rlbench/tasks/data/") and n.endswith(".jsonl") for n in names)
    # the installed package, not the checkout, answers (sys.path comes before the editable finder)
    code = ("import rlbench, rlbench.training.cost as c; t, src = c.price_table(); "
            "print(rlbench.__file__); print(src, t['cpu_core_hour'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path).stdout.split("\n")
    assert out[0].startswith(str(tmp_path / "site"))
    assert out[1].startswith("rlbench/prices.yaml ") and float(out[1].split()[1]) > 0
