"""benchmarks/gpu_check.py --cpu-dry-run: the GPU check's code path on the CPU with tiny shapes, so the
script cannot rot while no GPU is at hand (every case in its own process, ZeRO-2 under accelerate)."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# every knob at least once (gradient checkpointing with the shared prompt forward off, LoRA, ZeRO-2
# under accelerate); the dry shapes are all tiny
CASES = ["0.5b-gc", "1.5b-lora", "0.5b-zero2"]


def test_cpu_dry_run_runs_every_kind_of_case_and_writes_its_figures(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--out",
                        str(tmp_path), "--cases", ",".join(CASES)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["skipped"] == {} and sorted(report["cases"]) == sorted(CASES)
    assert report["matmul_peak_flops"] > 0 and report["seconds"] < 600
    for name, c in report["cases"].items():
        assert c["device"] == "cpu" and c["step_seconds"] > 0 and c["generate_tokens_per_s"] > 0, name
        assert 0 < c["mfu"] and all(math.isfinite(x) for x in c["loss"] + c["grad_norm"]), name
        assert c["drift_max"] < 1e-3, name  # the CPU float32 default of rollout.max_logprob_drift holds
    assert report["cases"]["0.5b-zero2"]["zero"] and not report["cases"]["0.5b-gc"]["zero"]  # DeepSpeed really ran
    assert (tmp_path / "gpu_check.log").read_text().count("=== ") == len(CASES)
    assert "0.5b-zero2" in p.stdout and "figures in" in p.stdout
