"""Multi-turn trajectories: the token layout against a scripted engine (trained tokens are the
sampled ones, masks, logprob alignment, tool output, limits, template drift), TRL-style
environment classes, and environments that fail."""
import dataclasses
import time

import pytest

from conftest import tiny_config, train
from rlbench.config_env import EnvConfig
from rlbench.environments import chat
from rlbench.environments.episodes import Episodes
from rlbench.modeling.models import stop_token_ids
from rlbench.types import Prompt, Sampling
from scripted_engine import ScriptedConfig, ScriptedEngine

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'


class Calculator:
    """A TRL environment_factory-style class: no constructor arguments, reset, typed tools, reward."""

    def __init__(self):
        self.calls = 0

    def reset(self, **row):
        self.answer = row["answer"]
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first number
            b: the second number
        """
        self.calls += 1
        return a + b

    def get_reward(self) -> float:
        return float(self.calls > 0)


def _prompt(tok, i=0):
    msgs = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is 2 + 40?"}]
    return Prompt(id=f"p{i}", text=tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  answer=42, meta={"question": "What is 2 + 40?", "messages": msgs})


def _run(tok, script, env_cls=Calculator, n=2, cut=0, **limits):
    engine = ScriptedEngine(ScriptedConfig(script=script, cut=cut), None, tok, "cpu")
    cfg = dataclasses.replace(EnvConfig(factory="x:y"), **limits)
    episodes = Episodes(env_cls, cfg, tok, stop_token_ids(tok))
    ro, metrics = episodes.run(engine.generate, [_prompt(tok, 0), _prompt(tok, 1)], n, Sampling(max_tokens=64))
    return engine, ro, metrics


def test_token_layout_is_exactly_the_sampled_tokens_plus_masked_environment_tokens(tokenizer):
    tok = tokenizer
    engine, ro, metrics = _run(tok, [CALL, "<answer>42</answer>"])
    assert ro.n == 4 and ro.group.tolist() == [0, 0, 1, 1]
    turn0, turn1 = engine.tokens(0), engine.tokens(1)
    for i in range(ro.n):
        k = int(ro.attention()[i].sum())
        region = ro.completion_ids[i, :k].tolist()
        sampled = ro.completion_mask[i, :k].bool().tolist()
        env = ro.env_mask[i, :k].bool().tolist()
        assert all(a != b for a, b in zip(sampled, env))  # every token is either sampled or the environment's
        # trained tokens = the engine's sampled tokens, in order
        assert [t for t, s in zip(region, sampled) if s] == turn0 + turn1
        # the layout: turn 0, then environment tokens, then turn 1
        assert region[:len(turn0)] == turn0 and region[-len(turn1):] == turn1
        assert sampled == [True] * len(turn0) + [False] * (k - len(turn0) - len(turn1)) + [True] * len(turn1)
        # logprobs aligned with their tokens: the engine's -(pos + 1)/100 within each turn, 0 on env tokens
        lps = ro.sampler_logprobs[i, :k].tolist()
        want = [-(j + 1) / 100 for j in range(len(turn0))] + [0.0] * (k - len(turn0) - len(turn1)) + \
               [-(j + 1) / 100 for j in range(len(turn1))]
        assert lps == pytest.approx(want)
        # the tool's result is in the environment's tokens, under the template's tool role
        env_text = tok.decode([t for t, e in zip(region, env) if e])
        assert "42" in env_text and "tool" in env_text and env_text.rstrip().endswith("assistant")
        # the second call continued from exactly the trajectory's ids (no re-tokenization)
        assert engine.calls[1][i] == ro.prompt_ids[ro.group[i]] + region[:k - len(turn1)]
    assert ro.texts == ["<answer>42</answer>"] * 4
    assert [r["reward"] for r in ro.turns] == [1.0] * 4 and [r["turns"] for r in ro.turns] == [2] * 4
    assert metrics["env/template_drift"] == 0 and metrics["env/tool_calls_mean"] == 1.0
    assert metrics["env/drift_frac"] == 0.0
    assert metrics["env/tool_errors"] == 0 and metrics["env/errors"] == 0
    # the tool was listed in the system prompt (the template takes no tools=): its schema from the signature
    assert '"name": "add"' in tok.decode(ro.prompt_ids[0]) and '"a": {"type": "integer"' in tok.decode(ro.prompt_ids[0])


def test_the_model_inputs_attend_to_environment_tokens_but_train_on_sampled_ones(tokenizer):
    from rlbench.types import TrainBatch

    _, ro, _ = _run(tokenizer, [CALL, "<answer>42</answer>"])
    batch = TrainBatch.from_rollouts(ro)
    C = ro.completion_ids.shape[1]
    assert (batch["attention_mask"][:, -C:] == ro.attention().long()).all()
    assert batch.totals["tokens"] == ro.completion_mask.sum().item()
    trimmed = batch.trimmed()
    assert trimmed["completion_mask"].sum() == batch["completion_mask"].sum()  # no real token trimmed away
    assert trimmed["attention_mask"].sum() == batch["attention_mask"].sum()


def test_turn_and_tool_call_limits_end_trajectories(tokenizer):
    _, ro, metrics = _run(tokenizer, [CALL], max_turns=3)  # the model never stops calling
    assert [r["turns"] for r in ro.turns] == [3] * 4 and {r["ended_by"] for r in ro.turns} == {"max_turns"}
    _, ro, _ = _run(tokenizer, [CALL], max_turns=5, max_tool_calls=2)
    assert [r["tool_calls"] for r in ro.turns] == [2] * 4 and {r["ended_by"] for r in ro.turns} == {"max_tool_calls"}
    assert [r["turns"] for r in ro.turns] == [3] * 4  # the third turn asked for a third call
    _, ro, _ = _run(tokenizer, [CALL], max_turns=8, max_tool_calls=10, max_context_tokens=400)
    assert {r["ended_by"] for r in ro.turns} == {"context"} and int(ro.attention().sum(-1).max()) + \
        max(len(p) for p in ro.prompt_ids) <= 400


def test_a_turn_cut_by_the_token_limit_gets_its_end_of_turn_from_the_environment(tokenizer):
    tok = tokenizer
    engine, ro, metrics = _run(tok, [CALL + " and more text here", "<answer>42</answer>"], max_turns=2, cut=0)
    full, _ = engine.tokens(0), None
    engine, ro, metrics = _run(tok, ["<answer>42</answer> " + "x " * 40], cut=6)
    assert {r["truncated"] for r in ro.turns} == {True}
    # a truncated final turn: nothing appended after it, and no drift counted for the missing end-of-turn
    assert metrics["env/template_drift"] == 0


def test_tool_errors_are_observations_and_failing_environments_end_their_trajectory(tokenizer):
    class Raising(Calculator):
        def add(self, a: int, b: int) -> int:
            """Add.

            Args:
                a: a
                b: b
            """
            raise ValueError("no adding today")

    _, ro, metrics = _run(tokenizer, [CALL, "<answer>42</answer>"], env_cls=Raising)
    assert metrics["env/tool_errors"] == 4 and metrics["env/errors"] == 0
    bad = '<tool_call>{"name": "add", "arguments": </tool_call>'
    _, ro, metrics = _run(tokenizer, [bad, "<answer>42</answer>"])
    assert metrics["env/tool_errors"] == 4  # an unparseable call is answered with an error

    class BrokenReset(Calculator):
        def reset(self, **row):
            raise RuntimeError("cannot start")

    class Hanging(Calculator):
        def get_reward(self):
            time.sleep(30)

    _, ro, metrics = _run(tokenizer, ["<answer>42</answer>"], env_cls=BrokenReset)
    assert metrics["env/errors"] == 4 and [r["reward"] for r in ro.turns] == [0.0] * 4
    assert ro.completion_mask.sum() == 0  # nothing sampled, nothing trained
    t = time.perf_counter()
    _, ro, metrics = _run(tokenizer, ["<answer>42</answer>"], env_cls=Hanging, tool_timeout_s=0.5)
    assert time.perf_counter() - t < 10 and metrics["env/errors"] == 4
    assert [r["reward"] for r in ro.turns] == [0.0] * 4


def test_a_drifting_chat_template_is_counted(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # a template that trims assistant messages when it renders them: re-rendering the conversation then
    # differs from the sampled tokens (a leading space the model sampled disappears)
    tok.chat_template = tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    assert "trim" in tok.chat_template
    _, ro, metrics = _run(tok, ["   " + CALL, "  <answer>42</answer>"])
    assert metrics["env/template_drift"] > 0 and metrics["env/drift_frac"] == 1.0  # every trajectory drifted
    with pytest.raises(chat.EnvError, match="differ from the chat template"):
        _run(tok, ["   " + CALL, "  <answer>42</answer>"], on_drift="error")


def test_tool_schemas_come_from_the_signature_and_docstring():
    schemas = chat.tool_schemas(chat.tool_methods(Calculator()))
    assert schemas == [{"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "the first number"},
                                                        "b": {"type": "integer", "description": "the second number"}},
                       "required": ["a", "b"]}, "return": {"type": "integer"}}}]

    class Untyped:
        def lookup(self, key):
            return key
    with pytest.raises(ValueError, match="give every parameter a type"):
        chat.tool_schemas(chat.tool_methods(Untyped()))


def test_parse_tool_calls():
    assert chat.parse_tool_calls(CALL + " then " + CALL.replace("40", "1")) == [("add", {"a": 2, "b": 40}), ("add", {"a": 2, "b": 1})]
    assert chat.parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>') == [("f", {"x": 1})]
    errors = chat.parse_tool_calls('<tool_call>{"arguments": {}}</tool_call><tool_call>nope</tool_call>')
    assert all(isinstance(e, str) and e.startswith("error") for e in errors) and len(errors) == 2
    assert chat.parse_tool_calls("no calls") == []


def test_env_config_is_checked():
    from rlbench.config import ConfigError

    with pytest.raises(ConfigError, match="exactly one of name"):
        tiny_config(env={"max_turns": 2})
    with pytest.raises(ConfigError, match="did you mean 'max_turns'"):
        tiny_config(env={"name": "retry", "max_turn": 2})
    with pytest.raises(ConfigError, match="unknown environment 'retyr'; did you mean 'retry'"):
        tiny_config(env={"name": "retyr"})
    cfg = tiny_config(env={"name": "retry", "max_turns": 3, "discount": 0.5, "filter": ["void_turns"]})
    assert cfg.env.options.discount == 0.5 and cfg.env.max_turns == 3
    from rlbench import config

    assert config.resolve(cfg.to_dict()).env == cfg.env  # the written-out form reads back
    assert tiny_config().env is None


def test_a_training_run_with_the_retry_environment_logs_env_metrics_and_trains_only_sampled_tokens(tmp_path):
    import json

    cfg = tiny_config("train.steps=2", "rollout.max_tokens=6", env={"name": "retry", "max_turns": 3},
                      eval={"n": 4, "max_tokens": 6, "before": False, "after": True})
    steps = train(cfg, tmp_path / "run")
    # a random tiny model never answers right: every trajectory uses its 3 attempts
    assert [s["env/turns_mean"] for s in steps] == [3.0, 3.0]
    assert all(s["env/errors"] == 0 and s["env/template_drift"] >= 0 for s in steps)
    assert all(abs(s["sync/logprob_drift"]) < 1e-3 for s in steps)  # sampled tokens' logprobs match the trainer's
    # generated tokens count sampled tokens only; prefill counts the feedback messages too
    assert steps[-1]["tokens/generated"] <= 2 * 4 * 4 * 3 * 6
    ev = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert ev[-1]["n"] == 4
    # per attempt: never solved, over the 3 attempts every trajectory made (training and evaluation)
    assert ev[-1]["solved_by_attempt"] == [0.0, 0.0, 0.0] and steps[-1]["env/solved_by_attempt_3"] == 0.0


def test_retry_counts_what_is_solved_within_each_attempt(tokenizer):
    """The retry environment's attempts: a wrong first answer, then the right one; the share
    solved within k attempts is 0 at k = 1 and 1 from k = 2, in training metrics and by hand."""
    from rlbench.environments.episodes import solved_by_attempt
    from rlbench.plugins.environments.retry import RetryConfig, RetryEnv
    from rlbench.tasks.arithmetic import Arithmetic, ArithmeticConfig

    task = Arithmetic(ArithmeticConfig(digits=1), tokenizer)
    prompts = task.prompts("test", 2, seed=0)
    answer = prompts[0].answer
    engine = ScriptedEngine(ScriptedConfig(script=[f"<answer>{answer + 1}</answer>", f"<answer>{answer}</answer>"]),
                            None, tokenizer, "cpu")
    cfg = dataclasses.replace(EnvConfig(name="retry"), max_turns=3)
    episodes = Episodes(lambda: RetryEnv(RetryConfig(), task), cfg, tokenizer, stop_token_ids(tokenizer))
    ro, metrics = episodes.run(engine.generate, prompts[:1], 2, Sampling(max_tokens=16))
    assert [r["attempts"] for r in ro.turns] == [[0.0, 1.0], [0.0, 1.0]]  # stops at the first right answer
    assert metrics["env/turns_mean"] == 2.0
    assert [metrics[f"env/solved_by_attempt_{k}"] for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
    # by hand: right at once, right at the third try, never right (3 tries), no attempts reported
    mixed = [[1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], None]
    assert solved_by_attempt(mixed, 3) == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    assert solved_by_attempt([None, None], 3) == {}
    # an environment without attempts (the calculator) logs none
    _, _, plain = _run(tokenizer, [CALL, "<answer>42</answer>"])
    assert not any(k.startswith("env/solved_by_attempt") for k in plain)


def test_a_real_textarena_game_through_the_adapter(tokenizer):
    """GuessTheNumber, played by a scripted player: the game's text is the opening prompt and the
    observations, the moves are the sampled tokens, and the game's own outcome is the reward."""
    from rlbench.plugins.environments.textarena import TextArenaConfig, TextArenaEnv

    guesses = [f"[{k}]" for k in range(1, 21)]  # sweeps 1..20: wins within 20 moves
    engine = ScriptedEngine(ScriptedConfig(script=guesses), None, tokenizer, "cpu")
    cfg = dataclasses.replace(EnvConfig(factory="x:y"), max_turns=20)
    episodes = Episodes(lambda: TextArenaEnv(TextArenaConfig("GuessTheNumber-v0")), cfg, tokenizer,
                        stop_token_ids(tokenizer))
    ro, metrics = episodes.run(engine.generate, [_prompt(tokenizer, 0)], 2, Sampling(max_tokens=16))
    opening = tokenizer.decode(ro.prompt_ids[0])
    assert "Guess The Number" in opening and "What is 2 + 40" not in opening  # the game's text replaced the prompt
    assert [r["reward"] for r in ro.turns] == [1.0, 1.0] and {r["ended_by"] for r in ro.turns} == {"env_done"}
    turns = ro.turns[0]["turns"]
    assert ro.texts[0] == f"[{turns}]"  # the winning move is the guess of the last turn
    assert ro.turns[1]["turns"] == turns  # the G trajectories of a prompt play the same game
    env_text = tokenizer.decode(ro.completion_ids[0][ro.env_mask[0].bool()].tolist())
    assert ("higher" in env_text.lower() or "lower" in env_text.lower()) or turns == 1
    lose = ScriptedEngine(ScriptedConfig(script=["[0]"]), None, tokenizer, "cpu")  # never a valid guess
    ro, _ = episodes.run(lose.generate, [_prompt(tokenizer, 0)], 1, Sampling(max_tokens=16))
    assert ro.turns[0]["reward"] == 0.0


@pytest.mark.skipif(not __import__("os").environ.get("RLBENCH_REQUIRE_SANDBOX")
                    and __import__("rlbench.tasks.sandbox", fromlist=["x"]).probe()["level"] != "bwrap",
                    reason="bubblewrap isolation not available")
@pytest.mark.parametrize("name", ["fork_bomb", "infinite_loop", "memory_hog", "write_outside", "socket", "kill_parent"])
def test_hostile_code_through_the_python_tool_is_contained(tokenizer, name):
    import json
    import os

    from rlbench.plugins.environments.python import PythonConfig, PythonEnv
    from test_sandbox import BAD, SENTINEL, _stray

    if os.path.exists(SENTINEL):
        os.remove(SENTINEL)
    call = "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": BAD[name] + "\nprint('done')"}}) + "</tool_call>"
    engine = ScriptedEngine(ScriptedConfig(script=[call, "<answer>42</answer>"]), None, tokenizer, "cpu")
    cfg = dataclasses.replace(EnvConfig(factory="x:y"), tool_timeout_s=20)
    episodes = Episodes(lambda: PythonEnv(PythonConfig(timeout_s=2.0)), cfg, tokenizer, stop_token_ids(tokenizer))
    t = time.perf_counter()
    ro, metrics = episodes.run(engine.generate, [_prompt(tokenizer)], 1, Sampling(max_tokens=512))
    assert time.perf_counter() - t < 2.0 + 8
    assert ro.turns[0]["turns"] == 2 and ro.texts[0] == "<answer>42</answer>"  # the trajectory went on
    observation = tokenizer.decode(ro.completion_ids[0][ro.env_mask[0].bool()].tolist())
    assert "done" not in observation.split("tool")[-1] or name in ("write_outside", "socket", "kill_parent")
    time.sleep(0.2)
    assert _stray() == [] and not os.path.exists(SENTINEL)


def test_the_python_tool_returns_what_the_code_prints(tokenizer):
    from rlbench.plugins.environments.python import PythonConfig, PythonEnv

    env = PythonEnv(PythonConfig(sandbox_allow_weak=True))
    assert env.python("print(6 * 7)") == "42"
    assert "ZeroDivisionError" in env.python("1 / 0") and "exit status 1" in env.python("1 / 0")
    assert chat.tool_schemas(chat.tool_methods(env))[0]["function"]["parameters"]["required"] == ["code"]


def test_the_readme_environment_example_runs_unchanged(tokenizer, monkeypatch):
    from pathlib import Path

    from rlbench import environments, config

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "environments"))
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "multiturn.yaml", ["model.name=tiny-random"])
    make = environments.factory(cfg.env, task=None)
    call = '<tool_call>{"name": "multiply", "arguments": {"a": 123, "b": 45}}</tool_call>'
    engine = ScriptedEngine(ScriptedConfig(script=[call, "<answer>5535</answer>"]), None, tokenizer, "cpu")
    ro, metrics = Episodes(make, cfg.env, tokenizer, stop_token_ids(tokenizer)).run(
        engine.generate, [_prompt(tokenizer)], 2, Sampling(max_tokens=64))
    assert "5535" in tokenizer.decode(ro.completion_ids[0][ro.env_mask[0].bool()].tolist())
    assert metrics["env/tool_calls_mean"] == 1.0 and ro.texts == ["<answer>5535</answer>"] * 2
    listed = tokenizer.decode(ro.prompt_ids[0])
    assert '"name": "multiply"' in listed and '"name": "add"' in listed


def test_per_turn_rewards_reach_ppo_and_reinforce_pp_at_each_turns_last_sampled_token(tokenizer):
    import torch

    from rlbench import manager, ops
    from rlbench.types import StepContext

    class Graded(Calculator):
        get_reward = None  # the turn rewards are the trajectory's reward

        def turn_rewards(self):
            return [0.25, 1.0]  # the tool call earns a little, the answer the rest

    _, ro, _ = _run(tokenizer, [CALL, "<answer>42</answer>"], env_cls=Graded, n=1)
    mask = ro.completion_mask
    turn0 = int(mask[0].tolist().index(0.0)) - 1  # the last sampled token of turn 0
    last = int(ops.last_index(mask)[0])
    assert ro.turn_rewards[0, turn0] == 0.25 and ro.turn_rewards[0, last] == 1.0
    assert ro.turn_rewards[0].sum() == 1.25 and [r["reward"] for r in ro.turns] == [1.25, 1.25]
    # the token rewards: the turn rewards where they are, the rest of the scalar reward (a format
    # bonus of 0.1 here) on the last token; they sum to the trajectory's reward
    rewards = torch.tensor([1.35, 1.35])
    kl = torch.zeros_like(mask)
    token_r = ops.kl_penalized_rewards(rewards, mask, kl, 0.1, ro.turn_rewards)
    assert token_r[0, turn0].item() == pytest.approx(0.25) and token_r[0, last].item() == pytest.approx(1.1)
    assert token_r.sum(-1).tolist() == pytest.approx([1.35, 1.35])
    # PPO's GAE over them with values 0, γ = λ = 1: the advantage of a turn-0 token is the whole
    # return, of a turn-1 token only turn 1's
    ppo = manager.get("algorithm", "ppo")
    algo = ppo(ppo.Config(beta=0.0, gamma=1.0, lam=1.0, whiten_advantages=False))
    ctx = StepContext(step=1, ref_logprobs=torch.zeros_like(mask), values=torch.zeros_like(mask))
    batch = algo.prepare(ro, rewards, ctx)
    adv = batch["advantages"][0]
    assert adv[turn0].item() == pytest.approx(1.35) and adv[last].item() == pytest.approx(1.1)
    assert adv[turn0 + 1].item() == 0.0  # environment tokens carry none
    rpp = manager.get("algorithm", "reinforce_pp")
    returns = ops.returns_to_go(ops.kl_penalized_rewards(rewards, mask, kl, 0.0, ro.turn_rewards), mask)
    assert returns[0, turn0].item() == pytest.approx(1.35) and returns[0, last].item() == pytest.approx(1.1)
    assert rpp(rpp.Config(beta=0.0)).prepare(ro, rewards, StepContext(step=1))["advantages"].shape == mask.shape


def test_hook_rlbench_environments(tmp_path):
    """A third-party environment registered through the hook, named by env.name, with its own
    options checked like every section, trains in a run."""
    import json
    from dataclasses import dataclass

    import rlbench
    from rlbench import manager
    from rlbench.config import ConfigError

    @dataclass
    class EchoConfig:
        reply: str = "again"

    class Echo:  # a step environment: answers each turn with its option, twice
        Config = EchoConfig

        def __init__(self, options, task):
            self.options, self.task, self.turns = options, task, 0

        def reset(self, **row):
            return None

        def step(self, text):
            self.turns += 1
            return (self.options.reply, False) if self.turns < 2 else (None, True)

        def get_reward(self):
            return {"accuracy": 0.0, "turns": float(self.turns)}

    class Plugin:
        @rlbench.hookimpl
        def rlbench_environments(self):
            return {"echo": Echo}

    with manager.registered(Plugin()):
        with pytest.raises(ConfigError, match="unknown key 'replies' in section 'env'; did you mean 'reply'"):
            tiny_config(env={"name": "echo", "replies": "x"})
        cfg = tiny_config("train.steps=1", "rollout.max_tokens=4", env={"name": "echo", "reply": "more", "max_turns": 4},
                          eval={"n": 2, "max_tokens": 4, "before": False, "after": False})
        train(cfg, tmp_path / "run")
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["env/turns_mean"] == 2.0 and step["reward/turns"] == 2.0  # its reward components are logged
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["plugins"]["env"]["name"] == "echo"
