"""A third-party algorithm package (examples/rlbench-vanilla-pg), installed with pip, plugs in
through the entry point alone: listed by `rlbench plugins`, runnable by `rlbench run`."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "rlbench-vanilla-pg"


def test_example_plugin_installs_lists_and_runs(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "rlbench.cli", *args], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    rows = json.loads(cli("plugins", "--json").stdout)
    mine = [x for x in rows if x["name"] == "vanilla_pg"]
    assert mine == [{"kind": "algorithm", "name": "vanilla_pg", "module": "rlbench_vanilla_pg",
                     "target": "rlbench_vanilla_pg:VanillaPG", "source": "vanilla_pg"}]
    cli("run", "configs/smoke.yaml", "--set", "algorithm.name=vanilla_pg", "--set", "train.steps=2",
        "--set", "eval.before=false", "--out", str(tmp_path / "runs"))
    lines = (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert "name: vanilla_pg" in (tmp_path / "runs" / "smoke" / "config.yaml").read_text()


def test_the_core_does_not_name_the_example():
    for folder in ["rlbench", "plugins", "tasks"]:
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            assert "vanilla_pg" not in text and "rlbench_vanilla_pg" not in text, f
