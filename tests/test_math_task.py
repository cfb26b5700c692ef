"""MATH verifier: extraction, symbolic equivalence through math-verify, the hard time limit."""
import json
import threading
import time

import pytest

from rlbench.tasks.hendrycks_math import MATH, MATHConfig, check_many, prediction

ACCEPT = [  # (gold, completion)
    ("\\frac{1}{2}", "<answer>0.5</answer>"),
    ("\\frac{1}{2}", "so \\boxed{\\frac12}"),
    ("\\frac{1}{2}", "\\boxed{1/2}"),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}"),
    ("\\frac{\\sqrt{2}}{2}", "<answer>$\\sqrt{2}/2$</answer>"),
    ("2\\pi", "\\boxed{2\\pi}"),
    ("2\\pi", "<answer>2π</answer>"),
    ("\\pi/2", "\\boxed{\\frac{\\pi}{2}}"),
    ("(1,2]", "\\boxed{(1, 2]}"),
    ("[-2, 3)", "\\boxed{[-2,3)}"),
    ("3", "\\boxed{x = 3}"),
    ("\\text{(B)}", "<answer>B</answer>"),
    ("\\text{(B)}", "\\boxed{(B)}"),
    ("x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("2x+3", "\\boxed{3+2x}"),
    ("\\dfrac{3}{4}", "\\boxed{3/4}"),
    ("\\frac{1}{3}", "\\boxed{\\dfrac{1}{3}}"),
    ("0.25", "\\boxed{\\frac{1}{4}}"),
    ("\\frac{7}{2}", "\\boxed{3.5}"),
    ("10", "\\boxed{10.0}"),
    ("4\\sqrt{3}", "\\boxed{\\sqrt{48}}"),
    ("(3,-1)", "\\boxed{(3, -1)}"),
    ("-\\frac{1}{3}", "\\boxed{-1/3}"),
    ("90^\\circ", "\\boxed{90}"),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}"),
    ("11\\text{ cm}", "\\boxed{11}"),
    ("\\infty", "\\boxed{\\infty}"),
    ("e^{2}", "\\boxed{e^2}"),
    ("\\sqrt{3}", "<answer>\\boxed{\\sqrt{3}}</answer>"),
    ("2", "first \\boxed{3}, then a correction: \\boxed{2}"),  # the last box
    ("5", "<think>\\boxed{4}</think><answer>5</answer>"),  # the answer block wins
    ("5", "we get $\\boxed 5$."),  # no braces, as some MATH solutions write it
]

REJECT = [
    ("5", "\\boxed{6}"),
    ("[1,2)", "\\boxed{(1,2]}"),
    ("\\frac{1}{3}", "\\boxed{0.333}"),
    ("2", "<answer>2</answer><answer>3</answer>"),  # hedging
    ("2", "The answer is 2"),  # neither tags nor a box
    ("x^2", "\\boxed{x^3}"),
    ("\\sqrt{2}", "\\boxed{2}"),
    ("(3,-1)", "\\boxed{(-1,3)}"),  # ordered pair
    ("\\text{(B)}", "\\boxed{C}"),
    ("-3", "\\boxed{3}"),
    ("2\\pi", "\\boxed{2}"),
    ("10", "\\boxed{}"),
    ("10", "\uff1canswer\uff1e10\uff1c/answer\uff1e"),  # look-alike tags are not an answer
]


def test_verifier_cases():
    pairs = [(g, prediction(t)) for g, t in ACCEPT + REJECT]
    results, timeouts = check_many(pairs, timeout_s=20)
    assert timeouts == 0
    wrong = [(g, t) for (g, t), r, want in zip(ACCEPT + REJECT, results, [True] * len(ACCEPT) + [False] * len(REJECT))
             if r != want]
    assert wrong == []
    assert len(ACCEPT) + len(REJECT) >= 40


def test_prediction_extraction():
    assert prediction("<answer> $\\frac{1}{2}$ </answer>") == "\\frac{1}{2}"
    assert prediction("<answer>so \\boxed{7}</answer>") == "7"
    assert prediction("\\boxed{\\frac{a}{\\sqrt{b}}} done") == "\\frac{a}{\\sqrt{b}}"
    assert prediction("<answer>1</answer><answer>2</answer>") is None
    assert prediction("no answer here") is None


SLOW = ("(1+\\sqrt{2})^{20000}", "(1-\\sqrt{2})^{20000}")  # sympy expands both: ~8 s for ^5000 here


def test_time_limit_holds_in_a_thread_and_the_pool_recovers():
    out = {}

    def work():
        t = time.perf_counter()
        out["res"] = check_many([SLOW, ("\\frac{1}{2}", "0.5")], timeout_s=2.0)
        out["wall"] = time.perf_counter() - t

    th = threading.Thread(target=work)  # outside the main thread: math-verify's signal timeouts would not work
    th.start()
    th.join(60)
    (results, timeouts) = out["res"]
    assert results == [False, True] and timeouts == 1
    assert out["wall"] < 2.0 * 2 + 10  # two 2 s budgets at most, plus worker start-up
    assert check_many([("\\frac{1}{4}", "0.25")], timeout_s=5) == ([True], 0)  # a fresh worker took over


def test_math_task_data_and_scoring(tokenizer):
    task = MATH(MATHConfig(), tokenizer)
    assert task.size("test") == 500
    prompts = task.prompts("test", 4, 0)
    assert all(p.id.startswith("math/test/") for p in prompts)
    texts = [f"<think>x</think><answer>{p.answer}</answer>" for p in prompts]
    texts[0] = "\\boxed{not an answer}"
    s = task.score(prompts, texts)
    assert s["accuracy"] == [0.0, 1.0, 1.0, 1.0] and s["format"] == [0.0, 0.1, 0.1, 0.1]
    # the train split reads the last \boxed{} of the solution (some write "\boxed 2"); two original
    # solutions end in an empty \boxed{} and are skipped (counted), not trained on with an empty reference
    assert task.size("train") == 12000 - 2 and task.skipped == {"train": 2}
    assert all(ans for _, _, ans in task.records("train"))


def _in_a_worker(queue):
    from rlbench.tasks.hendrycks_math import check_many

    queue.put(check_many([SLOW, ("\\frac{1}{2}", "0.5")], timeout_s=2.0))


def test_time_limit_holds_inside_a_worker_process():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_in_a_worker, args=(q,))
    p.start()
    res = q.get(timeout=120)
    p.join(30)
    assert res == ([False, True], 1) and p.exitcode == 0  # and the worker exits (its verifier pool stopped)


def test_subject_and_level_splits_are_disjoint_and_out_of_distribution():
    from rlbench.modeling import models
    from rlbench.tasks.hendrycks_math import MATH, MATHConfig, subject_and_level

    cfg = MATHConfig(subjects=["Algebra", "Prealgebra"], levels=[1, 2, 3])
    cfg.validate()
    task = MATH(cfg, models.load_tokenizer("tiny-random"))
    assert task.splits() == ["test", "ood_subjects", "ood_levels"]
    rows = {s: task.records(s) for s in ("train", "test", "ood_subjects", "ood_levels")}
    raw = {r["unique_id"]: r for r in map(json.loads, open(MATH.FILES["test"]))}
    for uid, *_ in rows["test"]:
        assert subject_and_level(raw[uid]) in {(s, lv) for s in ("Algebra", "Prealgebra") for lv in (1, 2, 3)}
    assert all(subject_and_level(raw[uid])[0] not in cfg.subjects and subject_and_level(raw[uid])[1] <= 3
               for uid, *_ in rows["ood_subjects"])
    assert all(subject_and_level(raw[uid])[0] in cfg.subjects and subject_and_level(raw[uid])[1] >= 4
               for uid, *_ in rows["ood_levels"])
    ids = {s: {r[0] for r in v} for s, v in rows.items() if s != "train"}
    assert not ids["test"] & ids["ood_subjects"] and not ids["test"] & ids["ood_levels"]
    assert not ids["ood_subjects"] & ids["ood_levels"] and min(map(len, ids.values())) > 20
    assert len(rows["train"]) < 12_000 and all(p.id.startswith("math/") for p in task.prompts("ood_levels", 5, 0))
    with pytest.raises(ValueError, match="unknown subject"):
        MATHConfig(subjects=["Algebr"]).validate()
    with pytest.raises(Exception, match="not 'ood_levels'"):
        MATH(MATHConfig(), models.load_tokenizer("tiny-random")).records("ood_levels")
