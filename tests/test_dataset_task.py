"""The ``dataset`` task: extract modes and verifiers on hand-written completions, the spec's data
errors before any model loads, the gold self-check and its refusal, the overlap count, and code
tests contained in the sandbox."""
import json
import os

import pytest

from conftest import tiny_config, train
from rlbench import cli
from rlbench.tasks import answers, verifiers
from rlbench.tasks.dataset import Dataset
from rlbench.training import task_check
from rlbench.types import DataError
from rlbench.config import ConfigError

V = verifiers.VerifyOptions(choices="options")


def verify(name, completion, reference, extract, row=None, opts=V):
    prediction = answers.extract(completion, extract)
    return verifiers.resolve(name)([prediction], [reference], [row or {}], opts)[0]


# -- extract x verifier on hand-written completions: (extract, verifier, completion, reference, expected) --

CASES = [
    # tags: the single answer block only
    ("tags", "exact", "<think>so</think><answer>Paris</answer>", "paris", 1.0),
    ("tags", "exact", "The answer is Paris.", "Paris", 0.0),  # no block: no answer
    ("tags", "exact", "<answer>Paris</answer> or <answer>Lyon</answer>", "Paris", 0.0),  # hedging
    ("tags", "exact", "＜answer＞Paris＜/answer＞", "Paris", 0.0),  # look-alike brackets are not tags
    ("tags", "exact", "<answer>The  Eiffel Tower!</answer>", "eiffel tower", 1.0),  # SQuAD normalisation
    ("tags", "exact", "<answer>Eiffel-Tower</answer>", "eiffel tower", 0.0),  # SQuAD drops the hyphen: one token
    ("tags", "exact", "<answer>Eiffel Towers</answer>", "eiffel tower", 0.0),
    # tags_or_last_line
    ("tags_or_last_line", "exact", "Let me see.\nParis\n", "Paris", 1.0),
    ("tags_or_last_line", "exact", "Paris\nI am not sure.", "Paris", 0.0),
    ("tags_or_last_line", "exact", "Lyon\n<answer>Paris</answer>\nbye", "Paris", 1.0),  # the block wins
    # last_number with numeric: exact rationals, separators, Unicode minus
    ("last_number", "numeric", "<answer>1,234</answer>", "1234", 1.0),
    ("last_number", "numeric", "<answer>\u22123</answer>", "-3", 1.0),  # Unicode minus
    ("last_number", "numeric", "<answer>$18.00</answer>", "18", 1.0),
    ("last_number", "numeric", "<answer>18.5</answer>", "18", 0.0),
    ("last_number", "numeric", "3 apples and then 7", "7", 1.0),  # no block: the whole completion
    ("last_number", "numeric", "<answer>3</answer><answer>7</answer>", "7", 0.0),
    ("last_number", "numeric", "<answer>seven</answer>", "7", 0.0),
    # boxed with math
    ("boxed", "math", "<answer>$\\boxed{\\frac{1}{2}}$</answer>", "1/2", 1.0),
    ("boxed", "math", "so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("boxed", "math", "<answer>\\boxed{\\frac{1}{3}}</answer>", "\\frac12", 0.0),
    ("boxed", "math", "no box here", "2", 0.0),
    # choice: letters, option text, and a letter inside prose
    ("choice", "choice", "<answer>(B)</answer>", "B", 1.0),
    ("choice", "choice", "<answer>B.</answer>", "B", 1.0),
    ("choice", "choice", "I think the answer is C.", "C", 1.0),
    ("choice", "choice", "<answer>216</answer>", "B", 1.0),  # the option's text counts as its letter
    ("choice", "choice", "<answer>192</answer>", "B", 0.0),  # another option's text
    ("choice", "choice", "<answer>A</answer>", "B", 0.0),
    ("choice", "choice", "<answer>B</answer><answer>C</answer>", "B", 0.0),  # hedging
    ("choice", "choice", "<answer>b</answer>", "216", 0.0),  # lower-case letter is not an option letter
    ("choice", "choice", "<answer>B</answer>", "216", 1.0),  # a reference written as option text
    # regex extract; regex verifier (the reference is a pattern)
    ("regex: Final: (\\w+)", "exact", "Final: no\nFinal: yes", "yes", 1.0),  # the last match
    ("regex: Final: (\\w+)", "exact", "final yes", "yes", 0.0),
    ("tags", "regex", "<answer>colour</answer>", "colou?r", 1.0),
    ("tags", "regex", "<answer>colours</answer>", "colou?r", 0.0),  # the whole answer must match
    # f1: partial credit
    ("tags", "f1", "<answer>the cat sat</answer>", "cat sat down", 0.8),
    ("tags", "f1", "<answer>dog</answer>", "cat", 0.0),
]


@pytest.mark.parametrize("extract,verifier,completion,reference,expected", CASES)
def test_extract_and_verifier(extract, verifier, completion, reference, expected):
    row = {"options": ["192", "216", "200", "19"]}
    assert verify(verifier, completion, reference, extract, row) == pytest.approx(expected)


def test_modes_and_verifiers_refuse_unknown_names():
    assert "must be one of" in answers.check_mode("tag")
    assert "not a regular expression" in answers.check_mode("regex: (")
    with pytest.raises(ValueError, match="did you mean 'numeric'"):
        verifiers.resolve("numerc")
    with pytest.raises(ValueError, match="cannot import"):
        verifiers.resolve("no_such_module_x:fn")


def test_custom_verifier_from_an_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_verifier.py").write_text(
        "def close(prediction, reference, row):\n"
        "    return prediction is not None and abs(float(prediction) - float(reference)) <= row['tol']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = verifiers.resolve("my_verifier:close")
    assert fn(["3.1", "4", None], ["3", "3", "3"], [{"tol": 0.2}] * 3, V) == [1.0, 0.0, 0.0]


# -- the task built from files --

def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _spec(tmp_path, train, test=None, **task):
    spec = {"name": "dataset", "train_file": _write(tmp_path / "train.jsonl", train),
            "prompt": "{{ question }}", "answer": "{{ label }}", **task}
    if test is not None:
        spec["test_file"] = _write(tmp_path / "test.jsonl", test)
    return spec


MC = [{"question": f"q{i}: pick", "options": ["10", "20", "30"], "label": "ABC"[i % 3]} for i in range(12)]


def test_a_malformed_row_names_file_line_and_nearest_field_before_any_model_loads(tmp_path, monkeypatch):
    from rlbench.modeling import models
    from rlbench.training import trainer

    rows = MC[:5] + [{"question": "q5", "options": ["1"], "labl": "A"}] + MC[6:]
    cfg = tiny_config(task=_spec(tmp_path, rows, MC[:3]))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")
    monkeypatch.setattr(models, "load", no_model)
    with pytest.raises(DataError) as e:
        trainer.start(cfg, tmp_path / "run")
    msg = str(e.value)
    assert f"{tmp_path / 'train.jsonl'}:6" in msg and "'label'" in msg and "did you mean 'labl'" in msg
    assert not (tmp_path / "run").exists()


def test_a_template_error_and_a_bad_line_name_their_row(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text(json.dumps(MC[0]) + "\n{not json\n")
    cfg = tiny_config(task={**_spec(tmp_path, MC, MC[:2]), "train_file": str(tmp_path / "bad.jsonl")})
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        Dataset(cfg.task, tokenizer)
    cfg = tiny_config(task=_spec(tmp_path, MC, MC[:2], prompt="{{ question }} {{ options[5] }}"))
    with pytest.raises(DataError, match=r"train.jsonl:1: task.prompt does not render"):
        Dataset(cfg.task, tokenizer)


def test_csv_and_a_fixed_held_out_fraction(tmp_path, tokenizer):
    lines = ["question,label"] + [f"q{i},{i}" for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    spec = {"name": "dataset", "train_file": str(tmp_path / "d.csv"), "test_fraction": 0.25,
            "prompt": "{{ question }}", "answer": "{{ label }}", "verifier": "numeric", "extract": "last_number"}
    a, b = Dataset(tiny_config(task=spec).task, tokenizer), Dataset(tiny_config(task=spec, run={"seed": 7}).task, tokenizer)
    assert a.size("test") == 5 and a.size("train") == 15
    test_q = {it["question"] for it in a.records("test")}
    assert test_q == {it["question"] for it in b.records("test")}  # the same held-out rows for every run seed
    assert not test_q & {it["question"] for it in a.records("train")}
    assert a.records("train")[0]["where"].startswith(f"{tmp_path / 'd.csv'}:")


def test_overlap_counts_planted_duplicates_exactly(tmp_path, tokenizer):
    test = [dict(MC[0]), dict(MC[1]), {**MC[2], "label": "A" if MC[2]["label"] != "A" else "B"},
            {"question": "fresh", "options": ["1"], "label": "A"}]
    cfg = tiny_config(task=_spec(tmp_path, MC, test, extract="choice", verifier="choice", choices="options"))
    result = task_check.check(cfg, tokenizer)
    assert (result.overlap_prompts, result.overlap_pairs) == (3, 2)
    assert result.sizes == {"train": 12, "test": 4}
    assert result.gold_checked == 16 and result.gold_accepted == 16


def test_self_check_catches_letter_references_under_a_numeric_verifier(tmp_path, tokenizer, capsys):
    spec = _spec(tmp_path, MC, MC[:4], extract="last_number", verifier="numeric")
    cfg = tiny_config(task=spec)
    result = task_check.check(cfg, tokenizer)
    assert result.gold_checked == 16 and result.gold_accepted == 0
    assert result.kinds == {"choice": 16}
    reason = task_check.refusal(cfg, result)
    assert "rejects 16 of 16 gold answers" in reason and f"{tmp_path / 'train.jsonl'}:1 reference 'A'" in reason
    # rlbench run refuses it before loading the model, listing the first rejects
    cfg_file = tmp_path / "run.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump({**{k: v for k, v in tiny_config().to_dict().items() if k != "hooks"},
                                        "task": spec}))
    rc = cli.main(["run", str(cfg_file), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc != 0 and "rejects 16 of 16 gold answers" in err and "train.jsonl:2 reference 'B'" in err
    assert "gold self-check: 0/16 accepted" in err
    assert not (tmp_path / "runs").exists()
    # with the right verifier it passes, and max_gold_rejects tolerates a known number of rejects
    ok = tiny_config(task={**spec, "extract": "choice", "verifier": "choice"})
    assert task_check.refusal(ok, task_check.check(ok, tokenizer)) is None
    tolerant = tiny_config(task={**spec, "max_gold_rejects": 16})
    assert task_check.refusal(tolerant, task_check.check(tolerant, tokenizer)) is None


def test_a_constant_reference_is_a_warning(tmp_path, tokenizer):
    rows = [{**r, "label": "A"} for r in MC]
    result = task_check.check(tiny_config(task=_spec(tmp_path, rows, rows[:2])), tokenizer)
    assert any("every reference is 'A'" in w for w in result.warnings)
    assert "warning: every reference is 'A'" in result.format()


def test_built_in_tasks_pass_their_own_self_check(tokenizer):
    for task in ({"name": "arithmetic", "max_operand": 19, "test_fraction": 0.55}, {"name": "gsm8k"}, {"name": "math"}):
        result = task_check.check(tiny_config(task=task), tokenizer)
        assert result.gold_checked > 0 and result.rejects == [], (task, result.rejects[:3])
        assert result.overlap_pairs == 0 or task["name"] != "arithmetic"


# -- code_tests in the sandbox --

needs_sandbox = pytest.mark.skipif(
    not os.environ.get("RLBENCH_REQUIRE_SANDBOX") and __import__("rlbench.tasks.sandbox", fromlist=["x"]).probe()["level"] != "bwrap",
    reason="bubblewrap isolation not available")

CODE_ROWS = [{"text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
              "test_list": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}] * 3


@needs_sandbox
def test_code_tests_passes_good_code_and_contains_a_hostile_program(tmp_path, tokenizer):
    spec = _spec(tmp_path, CODE_ROWS, CODE_ROWS[:1], prompt="{{ text }}", answer="{{ code }}", extract="code",
                 verifier="code_tests", tests="{{ test_list | join('\\n') }}", timeout_s=3.0)
    task = Dataset(tiny_config(task=spec).task, tokenizer)
    p = task.prompts("test", 1, 0)[0]
    fence = "```python\n{}\n```"
    good = "<answer>" + fence.format("def add(a, b):\n    return b + a") + "</answer>"
    wrong = "<answer>" + fence.format("def add(a, b):\n    return a - b") + "</answer>"
    bomb = "<answer>" + fence.format("import os\nwhile True:\n    os.fork()\ndef add(a, b):\n    return a + b") + "</answer>"
    escape = "<answer>" + fence.format("open('/tmp/rlbench-dataset-escape', 'w').write('x')\ndef add(a, b):\n"
                                       "    return a + b") + "</answer>"
    import time

    t = time.perf_counter()
    scores = task.score([p] * 4, [good, wrong, bomb, escape])["accuracy"]
    assert scores[:3] == [1.0, 0.0, 0.0]
    assert time.perf_counter() - t < 3.0 * 4 + 8  # the fork bomb is killed at its limit
    assert not os.path.exists("/tmp/rlbench-dataset-escape")  # the sandbox's /tmp is its own
    assert task.manifest_info()["sandbox"]["level"] == "bwrap"
    result = task_check.check(tiny_config(task=spec), tokenizer)
    assert (result.gold_checked, result.gold_accepted) == (4, 4)


@needs_sandbox
def test_the_mbpp_spec_passes_its_self_check_on_a_sample(tokenizer):
    """The run's check (64 programs per split); the whole set is the slow test below."""
    from rlbench import config

    cfg = config.load("configs/tasks/mbpp.yaml", ["model.name=tiny-random"])
    result = task_check.check(cfg, tokenizer, sandbox_limit=64)
    assert result.sizes == {"train": 374, "test": 500} and result.gold_checked == 128
    assert {r.id for r in result.rejects} <= {"dataset/train/601", "dataset/train/927", "dataset/test/367"}
    assert task_check.refusal(cfg, result) is None and result.overlap_prompts == 0


@needs_sandbox
@pytest.mark.slow
def test_every_mbpp_canonical_solution_but_three_passes(tokenizer):
    from rlbench import config

    cfg = config.load("configs/tasks/mbpp.yaml", ["model.name=tiny-random"])
    result = task_check.check(cfg, tokenizer)
    assert result.gold_checked == 874
    assert sorted(r.id for r in result.rejects) == ["dataset/test/367", "dataset/train/601", "dataset/train/927"]


# -- reasoning-gym --

def test_reasoning_gym_held_out_is_disjoint_and_scored_by_its_own_scorer(tokenizer):
    import reasoning_gym

    from rlbench.tasks.procedural import ReasoningGym

    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # few distinct problems
    cfg = tiny_config(task={"name": "reasoning_gym", "dataset": "chain_sum", "config": options, "size": 300,
                            "test_size": 50})
    task = ReasoningGym(cfg.task, tokenizer)
    train = {p.meta["question"] for p in task.all_prompts("train")}
    test = [p.meta["question"] for p in task.all_prompts("test")]
    assert task.dropped > 0 and not train & set(test)  # small space: collisions happened and were dropped
    assert test == [p.meta["question"] for p in ReasoningGym(tiny_config(task={**cfg.to_dict()["task"], "data_seed": 3}).task,
                                                             tokenizer).all_prompts("test")]
    # its own scorer: the task's accuracy equals reasoning-gym's score_answer on what it reads
    prompts = task.prompts("test", 4, seed=0)
    ds = reasoning_gym.create_dataset("chain_sum", size=50, seed=12345, **options)
    texts = [f"<answer>{p.answer}</answer>" for p in prompts[:2]] + ["<answer>-999</answer>", "no answer"]
    expected = [ds.score_answer(a, ds[i]) for i, a in enumerate([prompts[0].answer, prompts[1].answer, "-999", None])]
    assert task.score(prompts, texts)["accuracy"] == expected == [1.0, 1.0, 0.0, 0.0]
    result = task_check.check(cfg, tokenizer)
    assert result.rejects == [] and result.overlap_prompts == 0


def test_reasoning_gym_refuses_an_unknown_dataset_or_option():
    from rlbench.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'chain_sum'"):
        tiny_config(task={"name": "reasoning_gym", "dataset": "chain_sums"})
    cfg = tiny_config(task={"name": "reasoning_gym", "dataset": "chain_sum", "config": {"max_terms": 0}})
    from rlbench.modeling import models

    with pytest.raises(DataError, match="chain_sum with config"):
        __import__("rlbench.tasks.procedural", fromlist=["x"]).ReasoningGym(cfg.task, models.load_tokenizer("tiny-random"))


def test_the_readme_task_plugin_example_checks_and_scores(tokenizer, monkeypatch):
    from pathlib import Path

    from rlbench import manager

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "task_plugin"))
    reverse = __import__("reverse")
    with manager.registered(reverse):
        cfg = tiny_config(task={"name": "reverse", "length": 4})
        result = task_check.check(cfg, tokenizer)
        assert result.gold_checked == 400 and result.rejects == [] and result.overlap_prompts == 0
        task = manager.get("task", "reverse")(cfg.task, tokenizer)
        p = task.prompts("test", 1, seed=5)[0]
        assert task.score([p] * 3, [f"<answer>{p.answer}</answer>", f"<answer>{p.meta['question']}</answer>",
                                    p.answer])["accuracy"] == [1.0, 0.0, 0.0]


def test_a_dataset_run_records_its_label_and_data_hashes(tmp_path):
    from rlbench.tasks.rows import file_hash
    from rlbench.training import trainer

    spec = _spec(tmp_path, MC, MC[:4], label="picks", extract="choice", verifier="choice", choices="options")
    cfg = tiny_config("train.steps=1", task=spec)
    train(cfg, tmp_path / "run")
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["data"]["task"] == "picks"
    files = man["task_info"]["data_files"]
    assert files == {spec["train_file"]: file_hash(spec["train_file"]), spec["test_file"]: file_hash(spec["test_file"])}
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward/accuracy" in step and "reward/format" in step
    # another file under the same config is another data hash
    (tmp_path / "run2").mkdir()
    _write(tmp_path / "train.jsonl", MC[::-1])
    t = trainer.start(cfg, tmp_path / "run2")
    t.close()
    assert json.loads((tmp_path / "run2" / "manifest.json").read_text())["data"]["hash"] != man["data"]["hash"]


@pytest.mark.slow
def test_the_letter_answer_example_trains_with_nonzero_accuracy_on_the_embedded_model(tmp_path):
    """examples/unit-conversion for 2 steps on SmolLM2-135M-Instruct (hf engine): the reward's
    accuracy component is above 0 in the log, i.e. letter answers are read and verified."""
    from pathlib import Path

    from rlbench import config

    root = Path(__file__).resolve().parents[1]
    cfg = config.load(root / "examples/unit-conversion/config.yaml",
                      ["train.steps=2", "engine.name=hf", f"task.train_file={root}/examples/unit-conversion/train.jsonl",
                       f"task.test_file={root}/examples/unit-conversion/test.jsonl", "eval.before=false", "eval.after=false"])
    steps = train(cfg, tmp_path / "run")
    assert max(s["reward/accuracy"] for s in steps) > 0, steps


def test_eval_files_are_more_held_out_splits_evaluated_with_eval_splits(tmp_path):
    rephrased = [{"question": f"Which one, q{i}?", "options": ["10", "20", "30"], "label": "ABC"[i % 3]} for i in range(5)]
    spec = _spec(tmp_path, MC, MC[:3], eval_files={"ood_rephrased": _write(tmp_path / "reph.jsonl", rephrased)})
    cfg = tiny_config("eval.splits=[ood_rephrased]", "eval.before=true", "train.steps=1", task=spec)
    train(cfg, tmp_path / "run")
    (rec,) = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert rec["n"] == 3 and rec["splits"]["ood_rephrased"]["n"] == 5
    assert sorted(rec["splits"]["ood_rephrased"]["ids"]) == [f"dataset/ood_rephrased/{i}" for i in range(5)]
    with pytest.raises(ConfigError, match="eval_files maps new split names"):
        tiny_config(task=_spec(tmp_path, MC, MC[:3], eval_files={"test": "x.jsonl"}))
    with pytest.raises(ConfigError, match="does not offer"):
        train(tiny_config("eval.splits=[ood_other]", task=spec), tmp_path / "run2")
