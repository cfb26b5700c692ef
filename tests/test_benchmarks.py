"""Benchmarks report a missing side loudly: a comparison whose peer failed is not a result."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_vs_trl_exits_nonzero_with_the_reason_in_the_ratio_line(tmp_path):
    # Both sides fail at start-up, for real: a TRL without GRPOConfig shadows the installed one
    # (or stands in for a missing one), and rlbench is told to load a plugin module that does not exist.
    fake = tmp_path / "fake" / "trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0-test"\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "RLBENCH_PLUGINS": "no_such_plugin_module"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--modes", "trl-hf,rlbench-hf",
                        "--steps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    ratio = [ln for ln in p.stdout.splitlines() if ln.startswith("ratio ")]
    assert len(ratio) == 1, p.stdout
    assert ratio[0].startswith("ratio rlbench-hf / trl-hf (both HF generate): unavailable (")
    assert "rlbench-hf failed: rlbench.config.ConfigError: " in ratio[0] and "'no_such_plugin_module'" in ratio[0]
    assert "trl-hf failed: ImportError: cannot import name 'GRPOConfig' from 'trl'" in ratio[0]
    assert "trl-hf        failed: ImportError" in p.stdout  # the mode's own line says it too
    assert "2 of 2 modes failed: trl-hf, rlbench-hf" in p.stderr
