"""How the policy and the environment speak: the text of a tool call, the environment's answers, and where a policy
turn ends, for a model without a chat template (`PlainTags`) and for a chat model (`ChatTemplate`).

The environment and the embedded demonstrations both write through a dialogue, so what SFT learns from is written
exactly as the rollouts build it. `dialogue_for(tokenizer)` picks one as prompts are rendered: the chat template's
own format when the tokenizer has a template (`model.chat_template`), the tag protocol otherwise.

- `PlainTags`: a call is `<calc> 12 + 7</calc>`; its closing tag ends the turn (a stop token: `stop_texts`) and the
  environment answers `<result> 19</result>`. Other turns end on EOS. The environment's words are appended as text.
  Numbers are written after a space, as the task's text writes them, so a scratch BPE tokenizer spells a number the
  same way in the question, the call, the result and the answer, and using the tool is copying.
- `ChatTemplate`: a call is the template's tool call, `<tool_call>\\n{"name": "calc", "arguments": {"expression":
  "12+7"}}\\n</tool_call>` (Qwen2.5's format; Hermes and others share it), and every turn ends on the template's
  end-of-turn token. The answer is a `tool` turn (the environment's words a `user` turn) appended through the
  template without rendering the history again: the template is rendered once, on a probe conversation, for the
  text it puts after an assistant turn's end and around a new turn's content (`_turn_after_assistant`), and that
  text, filled with the answer, is appended. A template that rewrites earlier turns when one is added is refused.

A malformed call (a closing tag alone, an empty call, bad JSON, an unknown tool, arguments the tool does not take,
a tool that raises) is answered `error: <reason>` in the tool's answer and counted by the environment.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pipeline.data.chat import has_template
from pipeline.data.tokenization import EOS_TOKEN
from pipeline.envs.tools import Tool, ToolAnswer

RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class Dialogue(Protocol):
    answer_prefix: str
    """Put before a value the policy or a tool writes (a space in plain text, as the task's text writes numbers;
    nothing at the start of a chat turn)."""

    def first(self, text: str, tools: Sequence[Tool]) -> str:
        """The first observation: the task's text, with the tools offered."""

    def call(self, tool: Tool, argument: str) -> str:
        """The text of a well-formed call (what a demonstration writes)."""

    def answer_call(self, action: str, tools: Mapping[str, Tool]) -> ToolAnswer | None:
        """The answer to the call `action` makes, None when it makes none (it is then the final answer)."""

    def said(self, text: str) -> str:
        """The environment's words (not a tool's result) as the next observation."""

    def stop_texts(self, tools: Sequence[Tool]) -> tuple[str, ...]:
        """Texts besides EOS that end a policy turn."""

    def closed(self, turn: str, tools: Sequence[Tool]) -> str:
        """A policy turn as it stands in the history (with the token that ended it)."""


def opening(name: str) -> str:
    return f"<{name}>"


def closing(name: str) -> str:
    return f"</{name}>"


def tag_tokens(names: Sequence[str]) -> list[str]:
    """Every tag of the protocol for these tools: what a scratch tokenizer learns as single tokens."""
    return [tag for name in names for tag in (opening(name), closing(name))] + [RESULT_OPEN, RESULT_CLOSE]


def _run(tool: Tool, argument: str, reply) -> ToolAnswer:
    try:
        return ToolAnswer(reply(tool.run(argument)))
    except Exception as error:  # noqa: BLE001 - a tool that raises is the policy's malformed call, answered
        return _error(f"{tool.name}: {error}", reply)


def _error(reason: str, reply) -> ToolAnswer:
    return ToolAnswer(reply(f"error: {reason}"), reason)


class PlainTags:
    """The tag protocol (see the module docstring); `eos` is the text of the token other turns end on."""

    answer_prefix = " "

    def __init__(self, eos: str = EOS_TOKEN) -> None:
        self.eos = eos

    def first(self, text: str, tools: Sequence[Tool]) -> str:
        return text

    def call(self, tool: Tool, argument: str) -> str:
        return f"{opening(tool.name)}{argument}{closing(tool.name)}"

    def reply(self, result: str) -> str:
        return f"{RESULT_OPEN}{self.answer_prefix}{result}{RESULT_CLOSE}"

    def answer_call(self, action: str, tools: Mapping[str, Tool]) -> ToolAnswer | None:
        stripped = action.rstrip()
        name = next((name for name in tools if stripped.endswith(closing(name))), None)
        if name is None:
            return None
        body = stripped[: -len(closing(name))]
        start = body.rfind(opening(name))
        if start < 0:
            return _error(f"{closing(name)} without {opening(name)}", self.reply)
        argument = body[start + len(opening(name)) :].strip()
        if not argument:
            return _error(f"empty {opening(name)} call", self.reply)
        return _run(tools[name], argument, self.reply)

    def said(self, text: str) -> str:
        return text

    def stop_texts(self, tools: Sequence[Tool]) -> tuple[str, ...]:
        return tuple(closing(tool.name) for tool in tools)

    def closed(self, turn: str, tools: Sequence[Tool]) -> str:
        return turn if any(turn.endswith(text) for text in self.stop_texts(tools)) else turn + self.eos


class ChatTemplate:
    """The chat template's tool calling (see the module docstring), for a tokenizer whose template and EOS
    `pipeline.data.chat.use_chat_template` has resolved."""

    answer_prefix = ""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token

    @functools.cached_property
    def tool_turn(self) -> tuple[str, str]:
        return _turn_after_assistant(self.tokenizer, "tool")

    @functools.cached_property
    def user_turn(self) -> tuple[str, str]:
        return _turn_after_assistant(self.tokenizer, "user")

    def first(self, text: str, tools: Sequence[Tool]) -> str:
        schemas = [tool.schema() for tool in tools] or None
        turns = [{"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(turns, tools=schemas, tokenize=False, add_generation_prompt=True)

    def call(self, tool: Tool, argument: str) -> str:
        payload = json.dumps({"name": tool.name, "arguments": {tool.parameter: argument}})
        return f"{CALL_OPEN}\n{payload}\n{CALL_CLOSE}"

    def reply(self, result: str) -> str:
        return self.tool_turn[0] + result + self.tool_turn[1]

    def answer_call(self, action: str, tools: Mapping[str, Tool]) -> ToolAnswer | None:
        if not tools or (CALL_OPEN not in action and CALL_CLOSE not in action):
            return None
        start, end = action.rfind(CALL_OPEN), action.rfind(CALL_CLOSE)
        if start < 0 or end < start:
            return _error(f"{CALL_OPEN} and {CALL_CLOSE} do not enclose a call", self.reply)
        body = action[start + len(CALL_OPEN) : end].strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError as error:
            return _error(f"the call is not JSON ({error.msg} at character {error.pos})", self.reply)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return _error('the call is not an object with a "name"', self.reply)
        tool = tools.get(call["name"])
        if tool is None:
            return _error(f"unknown tool {call['name']!r}; the tools are {', '.join(sorted(tools))}", self.reply)
        arguments = call.get("arguments")
        if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI's API does
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        if not isinstance(arguments, dict) or set(arguments) != {tool.parameter}:
            return _error(f'{tool.name} takes "arguments": {{"{tool.parameter}": ...}}', self.reply)
        return _run(tool, str(arguments[tool.parameter]), self.reply)

    def said(self, text: str) -> str:
        return self.user_turn[0] + text.strip() + self.user_turn[1]

    def stop_texts(self, tools: Sequence[Tool]) -> tuple[str, ...]:
        return ()

    def closed(self, turn: str, tools: Sequence[Tool]) -> str:
        return turn + self.eos


_MARK = "\x00CONTENT\x00"


def _turn_after_assistant(tokenizer, role: str) -> tuple[str, str]:
    """The text a template writes after an assistant turn's end-of-turn token, up to a new `role` turn's content,
    and from its content through the next generation prompt: (before, after)."""
    probe: list[dict[str, Any]] = [{"role": "user", "content": "PING"}, {"role": "assistant", "content": "PONG"}]
    try:
        head = tokenizer.apply_chat_template(probe, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*probe, {"role": role, "content": _MARK}], tokenize=False, add_generation_prompt=True
        )
    except Exception as error:  # noqa: BLE001 - a template raises what it likes (jinja's TemplateError, its own)
        raise ValueError(
            f"model.chat_template: the template cannot render a {role!r} turn after an assistant turn ({error}); "
            "use a model whose template has tool calling, or set model.chat_template to a Jinja file that does"
        ) from None
    after_pong = head.split("PONG", 1)[1] if "PONG" in head else ""
    if not full.startswith(head) or not after_pong.startswith(tokenizer.eos_token) or full.count(_MARK) != 1:
        raise ValueError(
            f"model.chat_template: adding a {role!r} turn after an assistant turn does not extend the rendered "
            "conversation, so an environment's answer cannot be appended to a trajectory without rendering it again; "
            "use a template that renders turns one after another (ChatML, Qwen2.5, Llama 3)"
        )
    before, after = full[len(head) :].split(_MARK)
    return after_pong[len(tokenizer.eos_token) :] + before, after


def dialogue_for(tokenizer) -> Dialogue:
    """The chat template's tool calling for a tokenizer with a template, the tag protocol otherwise."""
    if tokenizer is not None and has_template(tokenizer):
        return ChatTemplate(tokenizer)
    return PlainTags(tokenizer.eos_token if tokenizer is not None else EOS_TOKEN)
