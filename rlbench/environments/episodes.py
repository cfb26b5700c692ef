"""Multi-turn rollouts, token in and token out: an environment answers between the model's turns.

    prompt ids ─► engine ─► sampled₁ ─► environment ─► env tokens₁ ─► engine (from ids) ─► sampled₂ …

The G trajectories of each prompt advance turn by turn; every turn is one engine call for all
trajectories still running, continued from their token ids (``Prompt.token_ids``), so sampled
tokens are never decoded and re-encoded. An environment message enters the trajectory as the
tokens the chat template writes for it (``chat.Renderer.env_ids``), marked 0 in the loss mask
(``Rollouts.completion_mask``) and 1 in ``Rollouts.env_mask``; sampled tokens keep the engine's
logprobs. Each finished conversation is re-rendered with the chat template and the tokens that
differ from the trajectory are counted (``env/template_drift``); training always uses the exact
sampled tokens (``env.on_drift: count``) or the step is refused (``error``).

A turn with tool calls gets their results back as ``tool`` messages; a turn without one ends the
trajectory: its text is the final answer. Environments without tools answer each turn through
``step(text) -> (observation | None, done)`` with a ``user`` message. The reward is the
environment's ``get_reward()`` (a float, or named components) when it has one, otherwise the
task's verifier on the final assistant message (the sampler scores it). An environment may also
reward each turn (``turn_rewards() -> [float]``, one per assistant turn): those sit at each
turn's last sampled token in ``Rollouts.turn_rewards``, where PPO's GAE and REINFORCE++'s returns
read them, and their sum is the trajectory's reward for the group methods (unless ``get_reward``
gives one).

Limits and faults (rlbench/config_env.py): ``max_turns``; ``max_tool_calls`` (a turn past it ends
the trajectory); ``max_context_tokens`` for prompt plus completion region, each turn sampling at
most ``rollout.max_tokens``; environment messages cut to ``max_observation_tokens``;
``tool_timeout_s`` per call. A tool that raises or times out answers with its error (counted in
``tool_errors``), as does an unknown tool or a call that does not parse; an environment whose
``reset``, ``step`` or ``get_reward`` raises or times out ends its trajectory with reward 0
(``errors``). A hung call's thread is abandoned, not killed (Python cannot stop a thread): code
that may hang belongs in a sandbox, as the ``python`` environment's does.

Not covered: the G trajectories of a prompt starting differently (``reset``'s message may depend
on the row, not on chance); several tool calls of a turn running in parallel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from rlbench.config_env import EnvConfig
from rlbench.environments.chat import EnvError, Renderer, parse_tool_calls, timed, tool_methods, tool_schemas
from rlbench.types import Prompt, Rollouts, Sampling


@dataclass
class Trajectory:
    prompt: int  # index into the prompts
    env: object
    initial: list[dict]  # the messages the prompt renders
    prompt_ids: list[int]
    region: list[int] = field(default_factory=list)  # completion region: sampled and environment tokens
    sampled: list[float] = field(default_factory=list)  # 1 sampled, 0 environment
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # after the prompt: assistant and environment messages
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    errors: int = 0
    observation_tokens: int = 0
    void_turns: int = 0  # turns with neither a tool call nor an answer block (SimpleTIR)
    done: bool = False
    ended: bool = True  # the last turn sampled its end-of-turn token
    ended_by: str = ""  # answer | env_done | max_turns | max_tool_calls | context | error
    reward: object = None  # get_reward()'s value; None: the task scores the final answer
    turn_ends: list[int] = field(default_factory=list)  # each turn's last sampled token, as a region index
    turn_rewards: list[float] | None = None  # turn_rewards()'s values, one per assistant turn

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.region

    def last_text(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def record(self) -> dict:
        return {"turns": self.turns, "tool_calls": self.tool_calls, "tool_errors": self.tool_errors,
                "errors": self.errors, "observation_tokens": self.observation_tokens, "void_turns": self.void_turns,
                "ended_by": self.ended_by, "truncated": not self.ended, "reward": self.reward,
                "texts": [m["content"] for m in self.messages if m["role"] == "assistant"],
                "attempts": self.attempts()}

    def attempts(self) -> list[float] | None:
        """The environment's ``accuracies`` (each attempt's accuracy, an attribute or property, not a
        tool: ``retry`` has it), or None when it has none or it failed."""
        if self.env is None or self.errors:
            return None
        try:
            acc = getattr(self.env, "accuracies", None)
            return [float(a) for a in acc] if isinstance(acc, (list, tuple)) else None
        except Exception:  # an environment's property that raises costs its figure, not the trajectory
            return None


def solved_by_attempt(attempts: list[list[float] | None], limit: int) -> dict[int, float]:
    """{k: share of trajectories answered correctly within their first k attempts}, k = 1..limit,
    over the trajectories whose environment reports ``accuracies`` (a trajectory that ended with
    fewer attempts keeps its last state); {} when none does. For ``retry`` (which stops at the
    first right answer) k = 1 is first-try accuracy and the last k the final one."""
    have = [a for a in attempts if a is not None]
    if not have:
        return {}
    return {k: sum(any(x >= 1.0 for x in a[:k]) for a in have) / len(have) for k in range(1, limit + 1)}


class Episodes:
    """Runs an environment's trajectories for a batch of prompts through an engine."""

    def __init__(self, make_env: Callable[[], object], env: EnvConfig, tokenizer, stop_ids: list[int]):
        self.make_env, self.cfg, self.tok = make_env, env, tokenizer
        self.renderer = Renderer(tokenizer, stop_ids)

    # -- start ------------------------------------------------------------------------------------
    def _start(self, prompt: Prompt, index: int, n: int) -> tuple[list[Trajectory], list[dict]]:
        trajs, first_ids, schemas = [], None, []
        for _ in range(n):
            t = Trajectory(prompt=index, env=None, initial=[], prompt_ids=[])
            try:
                t.env = self.make_env()
                tools = tool_methods(t.env)
                schemas = tool_schemas(tools)
                row = {k: v for k, v in prompt.meta.items() if k != "messages"}
                opening = timed(t.env.reset, self.cfg.tool_timeout_s, **{**row, "answer": prompt.answer,
                                                                           "prompt_id": prompt.id})
            except Exception as e:  # noqa: BLE001 - a failing environment ends its trajectory, not the run
                t.errors, t.done, t.ended_by = 1, True, f"error: reset: {type(e).__name__}: {e}"
                opening, schemas = None, schemas
            t.initial = _opening(prompt, opening)
            text = self.renderer.render(t.initial, schemas, True) if (schemas or opening is not None) else prompt.text
            t.prompt_ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if first_ids is None:
                first_ids = t.prompt_ids
            elif t.prompt_ids != first_ids:
                raise EnvError(f"prompt {prompt.id!r}: the environment's reset() opened its {n} trajectories "
                               "differently; the G samples of a prompt must start from the same prompt")
            trajs.append(t)
        return trajs, schemas

    # -- one turn -----------------------------------------------------------------------------------
    def _respond(self, t: Trajectory, text: str, tools: dict) -> list[dict] | None:
        """The environment's messages after the assistant's ``text``, or None when the trajectory ends."""
        cfg = self.cfg
        if tools:
            calls = parse_tool_calls(text)
            if not calls:
                t.void_turns += "<answer>" not in text
                t.ended_by = "answer"
                return None
            if t.tool_calls + len(calls) > cfg.max_tool_calls:
                t.ended_by = "max_tool_calls"
                return None
            out = []
            for call in calls:
                t.tool_calls += 1
                if isinstance(call, str):  # did not parse
                    t.tool_errors += 1
                    out.append({"role": "tool", "content": call})
                    continue
                name, args = call
                if name not in tools:
                    t.tool_errors += 1
                    out.append({"role": "tool", "content": f"error: no tool {name!r}; tools: {', '.join(sorted(tools))}"})
                    continue
                try:
                    result = str(timed(tools[name], cfg.tool_timeout_s, **args))
                except Exception as e:  # noqa: BLE001 - the tool's error is the observation
                    t.tool_errors += 1
                    result = f"error: {type(e).__name__}: {e}"
                out.append({"role": "tool", "content": result})
            return out
        try:
            observation, done = timed(t.env.step, cfg.tool_timeout_s, text)
        except Exception as e:  # noqa: BLE001 - the environment failed: the trajectory ends with reward 0
            t.errors += 1
            t.ended_by = f"error: step: {type(e).__name__}: {e}"
            return None
        if done or observation is None:
            t.ended_by = "env_done"
            return None
        return [{"role": "user", "content": str(observation)}]

    def _cut(self, messages: list[dict]) -> list[dict]:
        limit = self.cfg.max_observation_tokens
        out = []
        for m in messages:
            ids = self.tok(m["content"], add_special_tokens=False)["input_ids"]
            content = m["content"] if len(ids) <= limit else self.tok.decode(ids[:limit]) + " [truncated]"
            out.append({**m, "content": content})
        return out

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, generate: Callable[[list[Prompt], int, Sampling], Rollouts], prompts: list[Prompt], n: int,
            sampling: Sampling) -> tuple[Rollouts, dict[str, float]]:
        """The trajectories of ``prompts`` (n each, group-major) and the step's env/ metrics."""
        trajs, tools_of = [], []
        for i, p in enumerate(prompts):
            ts, _ = self._start(p, i, n)
            trajs += ts
            tools_of += [tool_methods(t.env) if t.env is not None else {} for t in ts]
        for turn in range(self.cfg.max_turns):
            active = [i for i, t in enumerate(trajs) if not t.done]
            budget = {i: min(sampling.max_tokens, self.cfg.max_context_tokens - len(trajs[i].ids)) for i in active}
            for i in [i for i in active if budget[i] < 1]:
                trajs[i].done, trajs[i].ended_by = True, "context"
            active = [i for i in active if budget[i] >= 1]
            if not active:
                break
            asks = [Prompt(id=f"{prompts[trajs[i].prompt].id}#{i}/{turn}", text="", answer=None,
                           token_ids=trajs[i].ids) for i in active]
            out = generate(asks, 1, dataclasses.replace(sampling, max_tokens=max(budget[i] for i in active)))
            for row, i in enumerate(active):
                t = trajs[i]
                k = min(int(out.completion_mask[row].sum()), budget[i])
                t.region += out.completion_ids[row, :k].tolist()
                t.sampled += [1.0] * k
                t.turn_ends.append(len(t.region) - 1)
                lp = out.sampler_logprobs[row, :k].tolist() if out.sampler_logprobs is not None else [0.0] * k
                t.logprobs += lp
                t.turns += 1
                t.ended = out.finish_reasons[row] == "stop" and k == int(out.completion_mask[row].sum())
                text = self.tok.decode(out.completion_ids[row, :k].tolist(), skip_special_tokens=True)
                t.messages.append({"role": "assistant", "content": text})
                if not t.ended and budget[i] < sampling.max_tokens and k >= budget[i]:
                    t.done, t.ended_by = True, "context"  # cut by the context limit, not by rollout.max_tokens
                    continue
                reply = self._respond(t, text, tools_of[i])
                if reply is None:
                    t.done = True
                    continue
                if t.turns >= self.cfg.max_turns:
                    t.done, t.ended_by = True, "max_turns"
                    continue
                reply = self._cut(reply)
                ids = self.renderer.env_ids(reply, t.ended)
                t.region += ids
                t.sampled += [0.0] * len(ids)
                t.logprobs += [0.0] * len(ids)
                t.observation_tokens += len(ids)
                t.messages += reply
        for t in trajs:
            if not t.done:
                t.done, t.ended_by = True, t.ended_by or "max_turns"
            if t.env is not None and not t.errors and callable(getattr(t.env, "turn_rewards", None)):
                try:
                    t.turn_rewards = [float(x) for x in timed(t.env.turn_rewards, self.cfg.tool_timeout_s)][:t.turns]
                    t.reward = sum(t.turn_rewards)  # the trajectory's reward unless get_reward says otherwise
                except Exception as e:  # noqa: BLE001 - reward 0, counted
                    t.errors += 1
                    t.ended_by = f"error: turn_rewards: {type(e).__name__}: {e}"
            if t.env is not None and not t.errors and callable(getattr(t.env, "get_reward", None)):
                try:
                    t.reward = timed(t.env.get_reward, self.cfg.tool_timeout_s)
                except Exception as e:  # noqa: BLE001 - reward 0, counted
                    t.errors += 1
                    t.ended_by = f"error: get_reward: {type(e).__name__}: {e}"
            if t.errors:
                t.reward = 0.0
        return self._rollouts(prompts, trajs, n)

    def _rollouts(self, prompts: list[Prompt], trajs: list[Trajectory], n: int) -> tuple[Rollouts, dict[str, float]]:
        C = max(1, max(len(t.region) for t in trajs))
        N = len(trajs)
        pad = self.tok.pad_token_id
        ids = torch.full((N, C), pad, dtype=torch.long)  # [N, C]
        sampled = torch.zeros(N, C)  # [N, C] loss mask
        env = torch.zeros(N, C)  # [N, C] environment tokens
        lps = torch.zeros(N, C)  # [N, C]
        per_turn = torch.zeros(N, C) if any(t.turn_rewards is not None for t in trajs) else None  # [N, C]
        drift, drifted = 0, 0  # tokens that differ from the re-rendering; trajectories with any
        for i, t in enumerate(trajs):
            k = len(t.region)
            ids[i, :k] = torch.tensor(t.region, dtype=torch.long)
            sampled[i, :k] = torch.tensor(t.sampled)
            env[i, :k] = 1.0 - torch.tensor(t.sampled)
            lps[i, :k] = torch.tensor(t.logprobs)
            if per_turn is not None and t.turn_rewards and not t.errors:
                for end, r in zip(t.turn_ends, t.turn_rewards):
                    if end >= 0 and t.sampled[end]:  # a turn that sampled nothing has no token to hold it
                        per_turn[i, end] += r
            if t.turns and t.initial:  # a task without chat messages (Prompt.meta['messages']): not checked
                t_drift = self.renderer.drift(t.initial, _schemas(t), t.messages, t.ids, t.ended)
                drift += t_drift
                drifted += t_drift > 0
                if t_drift and self.cfg.on_drift == "error":
                    raise EnvError(f"trajectory of prompt {prompts[t.prompt].id!r}: {t_drift} token(s) differ from the "
                                   "chat template's rendering of its conversation (env.on_drift: error)")
        records = [t.record() for t in trajs]
        ro = Rollouts(prompts=list(prompts), prompt_ids=[trajs[g * n].prompt_ids for g in range(len(prompts))],
                      group=torch.arange(len(prompts)).repeat_interleave(n), completion_ids=ids,
                      completion_mask=sampled, sampler_logprobs=lps, texts=[t.last_text() for t in trajs],
                      finish_reasons=["stop" if t.ended else "length" for t in trajs], pad_id=pad, env_mask=env,
                      turns=records, turn_rewards=per_turn)
        metrics = {"env/turns_mean": sum(r["turns"] for r in records) / N,
                   "env/tool_calls_mean": sum(r["tool_calls"] for r in records) / N,
                   "env/tool_errors": float(sum(r["tool_errors"] for r in records)),
                   "env/errors": float(sum(r["errors"] for r in records)),
                   "env/observation_tokens": sum(r["observation_tokens"] for r in records) / N,
                   "env/void_turns": float(sum(r["void_turns"] for r in records)),
                   "env/template_drift": float(drift), "env/drift_frac": drifted / N}
        for k, share in solved_by_attempt([r["attempts"] for r in records], self.cfg.max_turns).items():
            metrics[f"env/solved_by_attempt_{k}"] = share
        return ro, metrics


def _schemas(t: Trajectory) -> list[dict]:
    return tool_schemas(tool_methods(t.env)) if t.env is not None else []


def _opening(prompt: Prompt, opening: str | None) -> list[dict]:
    """The prompt's messages, its last user message replaced by ``reset``'s when it gave one."""
    messages = [dict(m) for m in prompt.meta.get("messages") or []]
    if not messages:
        if opening is None:
            return []
        raise EnvError(f"prompt {prompt.id!r}: the task gives no chat messages (Prompt.meta['messages']), so the "
                       "environment's opening message or tools cannot be rendered into it")
    if opening is not None:
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user] = {"role": "user", "content": opening}
    return messages


def scores(task, prompts: list[Prompt], rollouts: Rollouts) -> dict[str, list[float]]:
    """Reward components of ``rollouts`` (``prompts`` expanded to its rows): the task's verifier on
    each final assistant message, replaced where the environment rewarded: a dict replaces every
    component, a float the accuracy; a trajectory whose environment failed scores 0 everywhere."""
    out = {k: [float(x) for x in v] for k, v in task.score(prompts, rollouts.texts).items()}
    for i, rec in enumerate(rollouts.turns or []):
        reward = rec.get("reward")
        if rec.get("errors"):
            given = {}
        elif isinstance(reward, dict):
            given = {k: float(v) for k, v in reward.items()}
        elif reward is not None:
            given = {**{k: v[i] for k, v in out.items()}, "accuracy": float(reward)}
        else:
            continue
        for k in set(out) | set(given):
            out.setdefault(k, [0.0] * rollouts.n)[i] = given.get(k, 0.0)
    return out


def filtered(rollouts: Rollouts, filters: list[str]) -> tuple[Rollouts, float]:
    """``rollouts`` with the loss mask zeroed on trajectories ``env.filter`` excludes (they still
    count in their group's reward statistics), and the share excluded."""
    if not filters or not rollouts.turns:
        return rollouts, 0.0
    drop = [("void_turns" in filters and r["void_turns"] > 0) or ("max_turns" in filters and r["ended_by"] == "max_turns")
            or ("truncated" in filters and r["truncated"]) for r in rollouts.turns]
    keep = torch.tensor([0.0 if d else 1.0 for d in drop]).unsqueeze(-1)  # [N, 1]
    return dataclasses.replace(rollouts, completion_mask=rollouts.completion_mask * keep), sum(drop) / len(drop)
