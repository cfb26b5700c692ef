"""Mutation score of the algorithm maths: bugs planted one at a time by mutmut, counted when the
fast algorithm tests catch them.

Scope (SCOPE): rlbench/ops.py, rlbench/policy_gradient.py, the algorithm plugins (plugins/algorithms/*.py) and the loss side
of the trainer's update (rlbench/training/accumulate.py). Tests (TESTS, DESELECT): the hand-computed,
property and accumulation tests of the algorithms; the learnability runs and whole-trainer tests
are left out (minutes each, and the bugs they would catch here are caught by the tests above).

mutmut imports one tree, so the project is first staged into a folder laid out as its import
names (plugins/ as rlbench/plugins, tasks/ as rlbench/tasks); mutmut then writes every mutant
into ``<stage>/mutants`` and runs, for each, the tests that reach the mutated function (forked
from one warmed-up process). Mutants that change nothing observable are listed with why in
benchmarks/mutation_equivalent.txt, one per line: the line mutmut removed, the line it added and
why, tab-separated (matched on the text, not on mutmut's numbering, which shifts as code changes);
the score is killed ÷ (all − equivalent). An entry that matches no surviving mutant is reported
as stale.

    pip install mutmut==3.8.1                   # the benchmark's one extra dependency
    python benchmarks/mutation_score.py         # prints the score and the survivors
    python benchmarks/mutation_score.py --stage /tmp/mut --keep   # keep the stage to inspect
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCOPE = ["rlbench/ops.py", "rlbench/policy_gradient.py", "rlbench/training/accumulate.py", "rlbench/plugins/algorithms/*"]
TESTS = ["test_ops.py", "test_properties.py", "test_accumulate.py", "test_algorithm_contracts.py", "test_grpo.py",
         "test_grpo_family.py", "test_dapo.py", "test_dpo.py",
         "test_ppo.py", "test_trainer.py", "test_off_policy.py", "test_imitation.py"]
DESELECT = ["learns", "dynamic_sampling", "cost_counts", "critic_from", "importance_correction_weights_are_one",
            "reference_is_frozen", "resume", "lag_of_one", "push_that", "asynchronous"]
EQUIVALENT = Path(__file__).resolve().parent / "mutation_equivalent.txt"


def stage(dest: Path) -> None:
    """The project laid out as its import names, the selected tests, and mutmut's settings."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "data")
    shutil.copytree(ROOT / "rlbench", dest / "rlbench", ignore=ignore)
    shutil.copytree(ROOT / "plugins", dest / "rlbench" / "plugins", ignore=ignore)
    shutil.copytree(ROOT / "tasks", dest / "rlbench" / "tasks", ignore=ignore)
    (dest / "tests").mkdir()
    for name in ["conftest.py", "rlbench_testing_plugins.py", *TESTS]:
        shutil.copy(ROOT / "tests" / name, dest / "tests" / name)
    # mutmut forks each mutant's test run from a warmed-up process: an OpenMP pool started before
    # the fork can hang the child (seen as timeouts), so torch runs single-threaded here
    conftest = dest / "tests" / "conftest.py"
    conftest.write_text(conftest.read_text().replace("torch.set_num_threads(min(2, os.cpu_count() or 1))",
                                                     "torch.set_num_threads(1)"))
    keyword = " and ".join(f"not {d}" for d in DESELECT)
    # the property tests draw the same examples for every mutant, so the score is reproducible
    (dest / "pyproject.toml").write_text(f"""
[tool.mutmut]
source_paths = ["rlbench/"]
only_mutate = {json.dumps(SCOPE)}
pytest_add_cli_args_test_selection = ["tests/"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "--hypothesis-seed=0", "-k", "{keyword}"]
use_git_change_detection = false

[tool.pytest.ini_options]
markers = ["slow: long tests"]
filterwarnings = ["ignore::DeprecationWarning", "ignore::FutureWarning"]
""")


def results(stage_dir: Path) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Every mutant's status, and each survivor's changed line as (removed, added), read in this
    process from what ``mutmut run`` left in the stage (``mutmut results`` / ``show`` do the same)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    here = Path.cwd()
    os.chdir(stage_dir)
    try:
        status, paths = {}, {}
        for path in walk_mutatable_files():
            m = SourceFileMutationData(path=path)
            m.load()
            for name, code in m.exit_code_by_key.items():
                status[name], paths[name] = status_by_exit_code[code], path
        diffs = {}
        for name, st in status.items():
            if st == "killed":
                continue
            text = get_diff_for_mutant(name, path=paths[name])
            minus = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("-") and not ln.startswith("---")]
            plus = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
            diffs[name] = (" | ".join(minus), " | ".join(plus))
        return status, diffs
    finally:
        os.chdir(here)


def equivalent_entries() -> list[tuple[str, str, str]]:
    """(removed line, added line, why) of each listed equivalent mutant: tab-separated lines."""
    entries = []
    if EQUIVALENT.is_file():
        for line in EQUIVALENT.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            removed, added, why = line.split("\t")
            entries.append((removed.strip(), added.strip(), why.strip()))
    return entries


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", help="folder to stage into (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the stage (mutmut browse / show work there)")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="mutants tested at a time")
    args = ap.parse_args()
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutation_score: needs mutmut: pip install mutmut==3.8.1")
    stage_dir = Path(args.stage or tempfile.mkdtemp(prefix="rlbench-mutation-"))
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    stage(stage_dir)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
                         cwd=stage_dir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (stage_dir / "mutmut-run.log").write_text(run.stdout + run.stderr)
    status, diffs = results(stage_dir)
    if not status:
        print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
        sys.exit("mutation_score: mutmut reported no mutants (see the output above)")
    survivors = [n for n, s in status.items() if s != "killed"]
    entries = equivalent_entries()
    used, equivalent, alive = set(), {}, []
    for name in survivors:
        removed, added = diffs[name]
        match = next((e for e in entries if e[0] == removed and e[1] == added), None)
        if match:
            equivalent[name] = match[2]
            used.add(match)
        else:
            alive.append(name)
    killed = sum(1 for s in status.values() if s == "killed")
    counted = len(status) - len(equivalent)
    score = killed / counted if counted else 0.0
    by_status = {}
    for s in status.values():
        by_status[s] = by_status.get(s, 0) + 1
    print(f"mutants: {len(status)} ({', '.join(f'{v} {k}' for k, v in sorted(by_status.items()))}); "
          f"{len(equivalent)} equivalent (benchmarks/mutation_equivalent.txt); {seconds / 60:.1f} min")
    print(f"mutation score: {killed} killed of {counted} non-equivalent = {100 * score:.1f}%")
    for name in alive:
        removed, added = diffs[name]
        print(f"  survived [{status[name]}] {name}: {removed}  =>  {added}")
    for e in entries:
        if e not in used:
            print(f"  stale equivalent entry (matches no surviving mutant): {e[0]} => {e[1]}")
    if args.keep or args.stage:
        print(f"stage kept: {stage_dir} (mutmut show NAME / mutmut browse there)")
    else:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
