"""The arithmetic task: disjoint splits, difficulty, answer extraction, format reward."""
import pytest

from rlbench.tasks.arithmetic import Arithmetic, ArithmeticConfig, extract_answer


def test_splits_are_disjoint_and_deterministic(tokenizer):
    t = Arithmetic(ArithmeticConfig(max_operand=19, test_fraction=0.55), tokenizer)
    test = t.prompts("test", 1000, seed=0)
    train = {p.id for s in range(20) for p in t.prompts("train", 50, seed=s)}
    assert 200 <= len(test) <= 260  # ~55% of 400 problems
    assert not train & {p.id for p in test}
    assert [p.id for p in t.prompts("test", 50, seed=7)] == [p.id for p in test[:50]]  # eval set ignores the seed
    assert [p.id for p in t.prompts("train", 8, seed=3)] == [p.id for p in t.prompts("train", 8, seed=3)]
    assert [p.id for p in t.prompts("train", 8, seed=3)] != [p.id for p in t.prompts("train", 8, seed=4)]


def test_difficulty_and_answers(tokenizer):
    t = Arithmetic(ArithmeticConfig(digits=2, operands=3, operations=["-", "*"]), tokenizer)
    for p in t.prompts("train", 30, seed=0):
        nums = p.id.split()
        assert len(nums) == 5 and all(int(x) < 100 for x in nums[::2])
        assert p.answer == eval(p.id)
        assert "<|im_start|>assistant" in p.text and p.meta["question"] in p.text
    big = Arithmetic(ArithmeticConfig(digits=6), tokenizer)  # space too large to enumerate
    assert len({p.id for p in big.prompts("test", 20, seed=0)}) == 20


def test_extraction_modes():
    assert extract_answer("<think>7+5</think> <answer>12</answer>", "tags") == 12
    assert extract_answer("so it is 12", "tags") is None
    assert extract_answer("so it is 1,200.", "tags_or_last_number") == 1200
    assert extract_answer("3 + 4 = 7", "tags_or_last_number") == 7
    assert extract_answer("<answer>-3</answer>", "tags") == -3
    assert extract_answer("<answer>3 or 4</answer>", "tags_or_last_number") is None  # ambiguous tag content
    assert extract_answer("12 <answer>7</answer>", "tags_or_last_number") == 7  # tags win


@pytest.mark.parametrize("text,acc,fmt", [
    ("<think>5 + 7 = 12</think> <answer>12</answer>", 1.0, 0.1),
    ("<think>5 + 7 = 13</think><answer>13</answer>", 0.0, 0.1),           # format without accuracy
    ("The answer is <answer>12</answer>", 1.0, 0.05),                      # one answer, no think: partial
    ("<think>x</think> <answer>12</answer><answer>12</answer>", 0.0, 0.0),  # two answers: no format, and
    ("5 + 7 = 12", 1.0, 0.0),                                               # last-number fallback
    ("<think>a <answer>1</answer></think> <answer>12</answer>", 0.0, 0.0),
])
def test_rewards(tokenizer, text, acc, fmt):
    t = Arithmetic(ArithmeticConfig(operations=["+"]), tokenizer)
    p = t._make("5 + 7", 12)
    scores = t.score([p], [text])
    assert scores["accuracy"] == [acc] and scores["format"] == [pytest.approx(fmt)]


def test_format_reward_cannot_outweigh_accuracy():
    with pytest.raises(ValueError):
        ArithmeticConfig(format_reward=0.5).validate()
