"""The chat side of an environment: its tools as JSON schemas, tool calls parsed from text, and
the token ids the chat template writes for environment messages (rlbench.environments.episodes).

Tools: an environment's public methods (typed parameters and a Google-style docstring, as for
TRL's ``environment_factory``) become JSON schemas (``transformers.utils.get_json_schema``),
given to the chat template as ``tools=`` when it takes them, otherwise listed in the system
prompt with the call syntax ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
(Hermes / Qwen style, which ``parse_tool_calls`` reads).
"""
from __future__ import annotations

import inspect
import json
import re
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
NOT_TOOLS = {"reset", "step", "get_reward", "turn_rewards", "close"}
TOOL_PROMPT = ("You can call these tools. To call one, write <tool_call>{\"name\": NAME, \"arguments\": {ARGUMENTS}}"
               "</tool_call>; its result comes back in the next message. When you know the answer, give it "
               "without a tool call.\nTools:\n")


class EnvError(RuntimeError):
    """An environment failed (raised or timed out): its trajectory ends with reward 0."""


# -- tools -------------------------------------------------------------------------------------

def tool_methods(env) -> dict:
    """The environment's tools: its public methods other than reset / step / get_reward / close."""
    out = {}
    for name, member in inspect.getmembers(env, inspect.ismethod):
        if not name.startswith("_") and name not in NOT_TOOLS:
            out[name] = member
    return out


def tool_schemas(tools: dict) -> list[dict]:
    from transformers.utils import get_json_schema

    schemas = []
    for name, fn in tools.items():
        try:
            schemas.append(get_json_schema(fn))
        except Exception as e:  # noqa: BLE001 - transformers says what is missing (types, docstring)
            raise ValueError(f"environment tool {name!r}: no JSON schema from its signature and docstring ({e}); "
                             "give every parameter a type and a Google-style docstring with Args:") from None
    return schemas


def parse_tool_calls(text: str) -> list[tuple[str, dict] | str]:
    """Each ``<tool_call>`` of ``text`` as (name, arguments), or an error message for one that
    does not parse."""
    out: list = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body.strip())
        except json.JSONDecodeError as e:
            out.append(f"error: the tool call is not valid JSON ({e.msg})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append('error: a tool call needs {"name": ..., "arguments": {...}}')
            continue
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                out.append("error: the tool call's arguments are not a JSON object")
                continue
        if not isinstance(args, dict):
            out.append("error: the tool call's arguments are not a JSON object")
            continue
        out.append((call["name"], args))
    return out


_POOL = ThreadPoolExecutor(8, thread_name_prefix="rlbench-env")


def timed(fn, timeout: float, *args, **kwargs):
    """``fn(*args, **kwargs)`` with a time limit; TimeoutError past it (the thread is abandoned)."""
    future = _POOL.submit(fn, *args, **kwargs)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        raise TimeoutError(f"no answer within {timeout:g} s") from None


# -- the chat template ---------------------------------------------------------------------------

class Renderer:
    """Token ids of environment messages as the tokenizer's chat template writes them."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        self.tok = tokenizer
        self.stop_ids = set(stop_ids)
        source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        self.takes_tools = "tools" in (source or "")
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        self.base = base
        self.base_text = tokenizer.apply_chat_template(base, tokenize=False)
        end = tokenizer.decode([sorted(stop_ids)[-1]]) if stop_ids else ""
        cut = self.base_text.rfind("y") + 1  # after the assistant's content
        self.turn_end = self.base_text[cut:]  # what the template writes after an assistant message
        self.end_text = end if end and self.turn_end.startswith(end) else ""

    def render(self, messages: list[dict], schemas: list[dict], generation_prompt: bool) -> str:
        """``messages`` with the tools (``tools=`` or listed in the system prompt) through the template."""
        if schemas and self.takes_tools:
            return self.tok.apply_chat_template(messages, tools=schemas, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        if schemas:
            listing = TOOL_PROMPT + "\n".join(json.dumps(s["function"] if "function" in s else s) for s in schemas)
            if messages and messages[0]["role"] == "system":
                messages = [{"role": "system", "content": messages[0]["content"] + "\n\n" + listing}] + messages[1:]
            else:
                messages = [{"role": "system", "content": listing}] + messages
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def env_ids(self, env_messages: list[dict], ended: bool) -> list[int]:
        """The tokens after a sampled turn up to the next assistant header: the template's end of the
        assistant turn (its end-of-turn token only when the turn did not sample it), then each
        environment message and the generation prompt."""
        full = self.tok.apply_chat_template(self.base + env_messages, tokenize=False, add_generation_prompt=True)
        if not full.startswith(self.base_text):
            raise EnvError("the chat template rewrites earlier turns when a message is added: "
                                    "multi-turn token deltas need a prefix-stable template")
        after = self.turn_end[len(self.end_text):] if ended else self.turn_end
        return self.tok(after + full[len(self.base_text):], add_special_tokens=False)["input_ids"]

    def drift(self, initial: list[dict], schemas: list[dict], messages: list[dict], ids: list[int], ended: bool) -> int:
        """Tokens of the trajectory ``ids`` that differ from the template's rendering of the whole
        conversation (``initial`` messages, then ``messages``: assistant turns as decoded text and the
        environment's): aligned positions that differ plus the difference in length. What the
        template writes after the final assistant message (its end-of-turn token when the last turn
        was cut by the token limit, the newline after it) is not counted."""
        text = self.render(initial + messages, schemas, generation_prompt=False)
        tail = self.turn_end[len(self.end_text):] if ended else self.turn_end
        if tail and text.endswith(tail):
            text = text[:len(text) - len(tail)]
        rendered = self.tok(text, add_special_tokens=False)["input_ids"]
        n = min(len(rendered), len(ids))
        return sum(a != b for a, b in zip(rendered[:n], ids[:n])) + abs(len(rendered) - len(ids))
