"""GPU readiness: the GPU path of rlbench in one short run, figures printed and written as JSON.

Each case trains a few GRPO steps through rlbench's own trainer (hf engine: the GPU machines
this check is for have no vLLM) on arithmetic prompts, with a model built from a real config
and random weights (nothing is downloaded):

  tiny            a 4-layer Llama, the smoke test of the path
  0.5b            Qwen2.5-0.5B-shaped, bf16 autocast over fp32 master weights, shared prompt forward
  0.5b-gc         the same with gradient checkpointing (the shared prompt forward turns itself off)
  0.5b-noshare    shared prompt forward off: every row runs its own prompt
  1.5b-gc         Qwen2.5-1.5B-shaped, gradient checkpointing
  1.5b-lora       the 1.5B shape with LoRA (peft, rank 16), adapters merged into the engine at every sync
  0.5b-zero2      DeepSpeed ZeRO-2 on one process (when deepspeed imports; configs/accelerate/zero2.yaml)

Per case: seconds per phase (median over the steps after the first), generation tokens/s of the hf
engine, training tokens/s, peak device memory, the train phase's model-FLOP utilisation (6N per
trained token, Kaplan et al., over a bf16 matrix-multiply peak measured in the same run; for LoRA
this 6N figure overstates the work, its backward skips the frozen weights' gradients), and the
largest and mean |trainer − engine| logprob of the sampled tokens: the evidence for the GPU default
of ``rollout.max_logprob_drift`` (2.0), which is lifted during the check so it measures, not stops.

On the device (no internet; Python 3.12 there): prepare the carry here, then one command there.

    python benchmarks/gpu_check.py --prepare .gpu_carry          # here: wheels + tokenizer, size checked
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_carry/whl/*.whl \\
      && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --carry .gpu_carry --out $OUT

``--prepare`` writes the carried set (``CARRY``: the rlbench wheel built from this checkout,
DeepSpeed built from its sdist and the wheels it needs that the device image lacks, and the
embedded model's tokenizer files) and fails when that set plus this checkout's tracked files exceed
the 64 MiB a device call may carry. ``--cpu-dry-run`` runs the same code path on the CPU with tiny
shapes (a test in the default suite runs it, so the script cannot rot while no GPU is at hand).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 2**20  # bytes a device call may carry: the working tree plus the carried folder
# Wheels the device image lacks (its package list: .library/device/KINDS.md), for CPython 3.12 x86-64.
CARRY = {"hjson": "3.1.0", "pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0",
         "typing-inspection": "0.4.5"}
DEEPSPEED = "0.19.8"  # built here from its sdist (PyPI has no wheel): pure Python, ops compiled on first use
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

QWEN = {"model_type": "qwen2", "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu"}
SHAPES = {  # real configs (Qwen2.5-0.5B and -1.5B, their config.json), random weights
    "tiny": {"model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 2048,
             "tie_word_embeddings": True},
    "0.5b": {**QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2},
    "1.5b": {**QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2},
}
DRY_SHAPE = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 2048}
CASES = {  # name: (shape, config overrides)
    "tiny": ("tiny", []),
    "0.5b": ("0.5b", []),
    "0.5b-gc": ("0.5b", ["train.gradient_checkpointing=true"]),
    "0.5b-noshare": ("0.5b", ["train.share_prompt_forward=false"]),
    "1.5b-gc": ("1.5b", ["train.gradient_checkpointing=true"]),
    "1.5b-lora": ("1.5b", ["train.gradient_checkpointing=true", "model.lora_rank=16", "model.lora_alpha=32",
                           "train.lr=1e-4"]),
    "0.5b-zero2": ("0.5b", []),
}
PHASES = ("rollout", "reward", "reference", "train", "sync")


def step_config(model_dir: Path, dry: bool) -> dict:
    """The GRPO step every case runs: 8 prompts × 8 samples, ≤ 128 tokens (dry run: 2 × 2, ≤ 8)."""
    p, g, t = (2, 2, 8) if dry else (8, 8, 128)
    return {"run": {"name": "gpu-check", "seed": 0}, "model": {"name": str(model_dir), "dtype": "auto"},
            "task": {"name": "arithmetic", "max_operand": 19, "operations": ["+"], "test_fraction": 0.55},
            "engine": {"name": "hf", "batch_size": 64},
            "rollout": {"prompts_per_step": p, "group_size": g, "max_tokens": t, "temperature": 1.0,
                        "max_logprob_drift": 1e9},  # measure the drift, do not stop on it
            "algorithm": {"name": "grpo", "beta": 0.04},
            "train": {"steps": 3, "lr": 1e-6, "micro_batch_size": 16, "warmup_steps": 0, "checkpoint_every": 0},
            "eval": {"before": False, "after": False, "n": 8, "max_tokens": t},
            "logging": {"loggers": [], "progress": False}}


def matmul_peak(device: str) -> float:
    """FLOP/s of a large matrix product (bf16 on the GPU, float32 on the CPU), the best of ten."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def build_model_dir(shape: dict, tokenizer_dir: Path, out: Path, device: str) -> int:
    """A model directory with random weights from ``shape`` and the carried tokenizer; returns N."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlbench.modeling import models

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kind = shape["model_type"]
    config = AutoConfig.for_model(kind, **{k: v for k, v in shape.items() if k != "model_type"},
                                  bos_token_id=tok.bos_token_id, eos_token_id=models.stop_token_ids(tok),
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it will run: seconds for 1.5B on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    models.save_whole(model, out)  # bf16 on disk; the trainer loads fp32 master weights from it
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run_case(name: str, tokenizer_dir: Path, dry: bool, work: Path) -> dict:
    """One case in this process: build its model, train its steps, return its figures."""
    import torch
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _steps import run_steps

    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    shape_name, overrides = CASES[name]
    shape = {**SHAPES[shape_name], **(DRY_SHAPE if dry else {})}
    t0 = time.perf_counter()
    n_params = build_model_dir(shape, tokenizer_dir, work / "model", device)
    build_s = time.perf_counter() - t0
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(step_config(work / "model", dry)))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = run_steps(cfg_path, ["logging.loggers=[]", *overrides], 3 if not dry else 2)
    timed = run.metrics[1:] or run.metrics
    med = {p: statistics.median(m.get(f"time/{p}", 0.0) for m in timed) for p in PHASES}
    trained = statistics.median(m.get("tokens/trained", 0.0) for m in timed)
    generated = statistics.median(m.get("tokens/generated", 0.0) for m in timed)
    return {"case": name, "shape": shape_name, "overrides": overrides, "device": device, "params": n_params,
            "build_seconds": build_s, "seconds_per_phase": med, "step_seconds": sum(med.values()),
            "generate_tokens_per_s": generated / max(med["rollout"], 1e-9),
            "train_tokens_per_s": trained / max(med["train"], 1e-9),
            "train_flops_per_s": 6 * n_params * trained / max(med["train"], 1e-9),
            "peak_device_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "drift_max": max(m.get("sync/logprob_drift", 0.0) for m in run.metrics),
            "drift_mean": statistics.mean(m.get("sync/logprob_drift_mean", 0.0) for m in run.metrics),
            "loss": [m.get("loss") for m in run.metrics], "grad_norm": [m.get("grad_norm") for m in run.metrics],
            "zero": bool(os.environ.get("ACCELERATE_USE_DEEPSPEED"))}


def child_command(name: str, args, work: Path) -> list[str] | None:
    """How the parent starts a case: in its own process (clean memory figures); ZeRO-2 under
    ``accelerate launch`` with one process, when DeepSpeed is importable."""
    own = [__file__, "--case", name, "--work", str(work)] + (["--carry", str(args.carry)] if args.carry else []) \
        + (["--cpu-dry-run"] if args.cpu_dry_run else [])
    if name.endswith("zero2"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return None
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "zero2.yaml"), "--num_processes", "1"]
        if not args.cpu_dry_run:
            launcher += ["--mixed_precision", "bf16"]
        return launcher + own
    return [sys.executable] + own


def orchestrate(args) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.cpu_dry_run else "cpu"
    t_start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "matmul_peak_flops": matmul_peak(device), "cases": {}, "skipped": {}}
    names = args.cases.split(",") if args.cases else list(CASES)
    log = open(out / "gpu_check.log", "w")
    for name in names:
        left = args.budget - (time.perf_counter() - t_start)
        if left < 20:
            report["skipped"][name] = f"out of time ({args.budget:.0f} s budget)"
            continue
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as work:
            cmd = child_command(name, args, Path(work))
            if cmd is None:
                report["skipped"][name] = "deepspeed is not installed"
                continue
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
            except subprocess.TimeoutExpired:
                report["skipped"][name] = f"timed out after {left:.0f} s"
                continue
            log.write(f"=== {name} (exit {p.returncode})\n{p.stderr[-6000:]}\n")
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CASE ")), None)
            if p.returncode != 0 or line is None:
                tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {p.returncode}"]
                report["skipped"][name] = f"failed: {tail[0][:300]}"
                continue
            case = json.loads(line[len("CASE "):])
            case["mfu"] = case["train_flops_per_s"] / report["matmul_peak_flops"]
            report["cases"][name] = case
    log.close()
    report["seconds"] = time.perf_counter() - t_start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, torch {report['torch']}: matmul peak {report['matmul_peak_flops'] / 1e12:.3g} TFLOP/s")
    for name, c in report["cases"].items():
        mem = f"{c['peak_device_memory_gb']:.1f} GB" if c["peak_device_memory_gb"] is not None else "-"
        print(f"  {name:<13} step {c['step_seconds']:6.2f} s (rollout {c['seconds_per_phase']['rollout']:.2f}, "
              f"train {c['seconds_per_phase']['train']:.2f}); gen {c['generate_tokens_per_s']:8.0f} tok/s; "
              f"train {c['train_tokens_per_s']:8.0f} tok/s, MFU {100 * c['mfu']:5.1f}%; peak {mem}; "
              f"drift max {c['drift_max']:.3g} mean {c['drift_mean']:.3g}")
    for name, why in report["skipped"].items():
        print(f"  {name:<13} not run: {why}")
    print(f"{report['seconds']:.0f} s in all; figures in {out / 'gpu_check.json'}")
    failed = [n for n, why in report["skipped"].items() if why.startswith(("failed", "timed out"))]
    return 1 if failed or not report["cases"] else 0


# -- the carry ------------------------------------------------------------------------------------

def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def carry_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def prepare(folder: Path) -> int:
    """Write the carried set into ``folder`` and check its size against the limit."""
    from rlbench.modeling import models

    folder = Path(folder)
    whl, tok = folder / "whl", folder / "tokenizer"
    shutil.rmtree(folder, ignore_errors=True)
    whl.mkdir(parents=True)
    tok.mkdir()
    src = models.embedded_model_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, tok / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(whl), str(ROOT)], check=True)
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(whl), f"deepspeed=={DEEPSPEED}"],
                   check=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "cp", *platforms, "-d", str(whl)]
                   + [f"{k}=={v}" for k, v in CARRY.items()], check=True)
    carried, tree = carry_size(folder), tracked_bytes()
    for p in sorted(whl.iterdir()):
        print(f"  {p.name:<60} {p.stat().st_size / 2**20:6.2f} MiB")
    print(f"carried {carried / 2**20:.1f} MiB + checkout {tree / 2**20:.1f} MiB = {(carried + tree) / 2**20:.1f} MiB "
          f"of {CARRY_LIMIT / 2**20:.0f} MiB")
    if carried + tree > CARRY_LIMIT:
        print("gpu_check: the carry is over the limit", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for gpu_check.json and .log")
    ap.add_argument("--carry", default=None, help="the folder --prepare wrote (its tokenizer/ is used)")
    ap.add_argument("--prepare", metavar="FOLDER", help="write the carried set into FOLDER and check its size")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same code path on the CPU with tiny shapes")
    ap.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all cases (default 420)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        return prepare(Path(args.prepare))
    if args.case:
        if args.carry:
            tokenizer_dir = Path(args.carry) / "tokenizer"
        else:  # here: the converted embedded model's tokenizer
            from rlbench.modeling import models

            tokenizer_dir = models.embedded_model_dir()
        result = run_case(args.case, tokenizer_dir, args.cpu_dry_run, Path(args.work))
        from rlbench.training import dist

        if dist.rank() == 0:
            print("CASE " + json.dumps(result), flush=True)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
