"""GSM8K verifier, the shared format/overlong rewards and the dataset loaders."""
import json
from fractions import Fraction

import pytest

from rlbench.tasks.common import PromptConfig, format_score, overlong, read_jsonl
from rlbench.tasks.gsm8k import GSM8K, GSM8KConfig, is_correct, reference_number
from rlbench.types import DataError

ACCEPT = [  # (reference, completion)
    (72, "<answer>72</answer>"),
    (72, "<answer>$72</answer>"),
    (72, "<answer>$72.00</answer>"),
    (72, "<answer>72.</answer>"),
    (72, "<answer>\\$72</answer>"),
    (72, "<answer>$ 72</answer>"),
    (72, "<answer>72 dollars</answer>"),
    (72, "<answer>72 apples.</answer>"),
    (72, "<answer>72 km/h</answer>"),
    (72, "<answer>**72**</answer>"),
    (72, "<answer>x = 72</answer>"),
    (72, "<answer> 72 </answer>\n"),
    (72, "<answer>72 (seventy-two)</answer>"),
    (72, "<think>3 + 4 = 7, so 70 + 2 = 72</think><answer>72</answer>"),
    (72, "<think>maybe 71</think>\n<answer>The total is 70 + 2 = 72</answer>"),
    (1234, "<answer>1,234</answer>"),
    (1234, "<answer>$1,234.00</answer>"),
    (1000000, "Total: 1,000,000"),
    (25, "<answer>25%</answer>"),
    (-5, "<answer>-5</answer>"),
    (-5, "<answer>\u22125</answer>"),  # Unicode minus
    (0, "<answer>0</answer>"),
    (18, "<answer>18.0</answer>"),
    (18, "So she earns $18.00 per day."),
    (72, "The answer is 72."),
    (72, "The final answer is 72"),
    (72, "Step 1: 3 apples and 4 oranges.\n#### 72"),
    (7, "3 apples and 4 oranges; the answer is 7."),
    (72, "He had 80 and lost 8, so 72"),
    (5, "<answer>5</answer> I hope 10 is not it"),  # a single block wins over later numbers
]

REJECT = [
    (72, "<answer>73</answer>"),
    (72, "<answer>72</answer><answer>73</answer>"),  # hedging
    (72, "<answer>72</answer> or maybe <answer>72</answer>"),  # repeated blocks, even if equal
    (72, "<answer>72.5</answer>"),
    (72, "<answer>720</answer>"),
    (72, "<answer>0.72</answer>"),
    (72, "<answer>-72</answer>"),
    (72, "72 is wrong, the answer is 73"),
    (72, ""),
    (72, "<answer></answer>"),
    (72, "<answer>seventy-two</answer>"),
    (72, "\uff1canswer\uff1e72\uff1c/answer\uff1e then 5"),  # look-alike brackets are not tags
    (72, "<answer>7,2</answer>"),
]


@pytest.mark.parametrize("ref,text", ACCEPT)
def test_gsm8k_accepts(ref, text):
    assert is_correct(text, Fraction(ref)), text


@pytest.mark.parametrize("ref,text", REJECT)
def test_gsm8k_rejects(ref, text):
    assert not is_correct(text, Fraction(ref)), text


def test_gsm8k_unclosed_tag_falls_back_to_the_last_number_and_tags_mode_does_not():
    assert is_correct("<answer>72", Fraction(72))
    assert not is_correct("<answer>72", Fraction(72), "tags")
    assert not is_correct("The answer is 72.", Fraction(72), "tags")
    assert is_correct("<answer>72</answer>", Fraction(72), "tags")


@pytest.mark.parametrize("answer,expected", [
    ("He beats 20*.8=<<20*.8=16>>16 people\nSo he loses to 20-16=<<20-16=4>>4 people\n#### 4", 4),
    ("…\n#### 1,000", 1000), ("#### -3", -3), ("5", 5), ("…#### 0.5", Fraction(1, 2)),
])
def test_gsm8k_reference_forms(answer, expected):
    assert reference_number(answer) == expected


def test_gsm8k_task_scores_against_the_dataset(tokenizer):
    task = GSM8K(GSM8KConfig(), tokenizer)
    assert task.size("train") == 7473 and task.size("test") == 1319
    prompts = task.prompts("test", 3, seed=0)
    assert prompts == task.prompts("test", 3, seed=99)  # the held-out set never depends on the seed
    assert {p.id for p in task.prompts("train", 50, 1)}.isdisjoint({p.id for p in task.prompts("test", 1319, 0)})
    texts = [f"<think>ok</think><answer>{p.answer}</answer>" for p in prompts]
    texts[1] = "<answer>-1</answer>"
    s = task.score(prompts, texts)
    assert s["accuracy"] == [1.0, 0.0, 1.0] and s["format"] == [0.1, 0.05, 0.1]


# -- the shared format and overlong rewards ---------------------------------------------------------

CFG = PromptConfig()


@pytest.mark.parametrize("text,prefilled,expected", [
    ("<think>a</think><answer>1</answer>", False, 0.1),
    ("\n<think>\nreasoning\n</think>\n\n<answer> 1 </answer>\n", False, 0.1),
    ("a</think><answer>1</answer>", True, 0.1),  # base prompt ended in <think>
    ("<answer>1</answer>", False, 0.05),  # no think block
    ("<think>a</think><answer>1</answer> and more", False, 0.05),  # text after </answer>
    ("Sure! <think>a</think><answer>1</answer>", False, 0.05),  # text before
    ("<think>a</think><think>b</think><answer>1</answer>", False, 0.05),  # repeated think
    ("<think>a<think>b</think></think><answer>1</answer>", False, 0.05),  # nested think
    ("<think>a</think><answer>1</answer><answer>2</answer>", False, 0.0),  # several answers
    ("<think><answer>1</answer></think><answer>1</answer>", False, 0.0),  # an answer inside think
    ("<think>a</think><answer><answer>1</answer></answer>", False, 0.0),  # nested answer
    ("<think>a</think><answer>1", False, 0.0),  # unclosed
    ("<think>a</think>", False, 0.0),
    ("<think>a</think>\uff1canswer\uff1e1\uff1c/answer\uff1e", False, 0.0),  # fullwidth look-alikes
    ("<think>a</think>\u2039answer\u203a1\u2039/answer\u203a", False, 0.0),  # single guillemets
    ("<think>a</think><Answer>1</Answer>", False, 0.0),  # tags are case-sensitive
    ("", False, 0.0),
])
def test_format_reward(text, prefilled, expected):
    assert format_score(text, CFG, prefilled) == expected


def test_format_reward_is_capped_by_config_validation():
    with pytest.raises(ValueError):
        PromptConfig(format_reward=0.5).validate()


def test_overlong_penalty():
    cfg = PromptConfig(overlong_threshold=10, overlong_penalty=0.1, overlong_ramp=10)
    assert [overlong(n, cfg) for n in (5, 10, 15, 25)] == pytest.approx([0.0, 0.0, -0.05, -0.1])
    assert overlong(1000, PromptConfig()) == 0.0  # off by default


def test_overlong_is_its_own_component(tokenizer):
    task = GSM8K(GSM8KConfig(overlong_threshold=10, overlong_ramp=4), tokenizer)
    p = task.prompts("test", 1, 0)
    s = task.score(p * 2, ["<answer>1</answer>", "<answer>1</answer> " + "word " * 20])
    assert s["overlong"][0] == 0.0 and s["overlong"][1] == pytest.approx(-0.1)


# -- data loading -------------------------------------------------------------------------------------

def test_local_files_and_malformed_rows(tmp_path, tokenizer):
    good = tmp_path / "train.jsonl"
    good.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n\n"
                    + json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
    task = GSM8K(GSM8KConfig(train_file=str(good)), tokenizer)
    assert sorted(p.answer for p in task.prompts("train", 2, 0)) == ["2", "4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl line 2: missing answer"):
        GSM8K(GSM8KConfig(test_file=str(bad)), tokenizer).prompts("test", 1, 0)
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        read_jsonl(bad, ("question",))
    with pytest.raises(ValueError, match="data file not found"):
        GSM8KConfig(train_file=str(tmp_path / "missing.jsonl")).validate()


def test_hugging_face_dataset_loader_on_a_local_dataset_directory(tmp_path, tokenizer):
    d = tmp_path / "my_gsm8k"
    d.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"question": f"{split} {i}?", "answer": f"#### {i}"}) + "\n"
                                                  for i in range(n)))
    task = GSM8K(GSM8KConfig(hf_dataset=str(d)), tokenizer)
    assert task.size("train") == 5 and task.size("test") == 3
    assert sorted(p.answer for p in task.prompts("test", 3, 0)) == ["0", "1", "2"]
    with pytest.raises(DataError, match="hf_dataset"):
        GSM8K(GSM8KConfig(hf_dataset=str(tmp_path / "nothing-here")), tokenizer).prompts("test", 1, 0)


def test_gold_is_the_worked_solution_without_calculator_annotations_and_passes_the_verifier():
    from rlbench.modeling import models
    from rlbench.tasks.gsm8k import GSM8K, GSM8KConfig

    task = GSM8K(GSM8KConfig(), models.load_tokenizer("tiny-random"))
    prompts = task.prompts("train", 300, seed=0)
    golds = [task.gold(p) for p in prompts]
    assert all("<<" not in g and g.startswith("<think>") and "####" not in g for g in golds)
    raw = {r["question"]: r["answer"] for r in map(json.loads, open(GSM8K.FILES["train"]))}
    p = next(p for p in prompts if "<<" in raw[p.meta["question"]])  # one whose solution had annotations
    assert p.meta["solution"] in task.gold(p) and p.meta["solution"].split()[0] in raw[p.meta["question"]]
    assert task.score(prompts, golds)["accuracy"] == [1.0] * 300
