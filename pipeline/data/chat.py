"""Conversations and chat templates: reading `{role, content}` turns, and rendering prompts the way a model expects.

A conversation is a list of turns, each a mapping with a `role` (`system`, `user`, `assistant`, `tool`) and a string
`content`. Wherever a conversation becomes training data, the *prompt* is every turn before the last assistant turn
and the *completion* is that turn's content. Anthropic-HH dialogues (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`) are
read as conversations too.

A conversation with tools (an assistant turn with `tool_calls`, or a `tool` turn, as hub chat datasets write them in
OpenAI's format) becomes one row per assistant turn (`tool_rows`): its prompt is the history rendered by the chat
template, its completion the text the template writes for that turn (a call is the template's own `<tool_call>`
text), so SFT trains on the assistant's tokens only and never on a tool's result. The tools offered are the row's
`tools` column when the dataset has one (JSON schemas, as TRL reads them).

How a prompt becomes text depends on the tokenizer (`model.chat_template`, resolved once in `prepare` and saved
with the tokenizer, so every later stage reads the same choice from `models/sft`):
- with a chat template, `apply_chat_template(turns, add_generation_prompt=True)`; a plain-text prompt is one user
  turn. Every completion then ends with the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`), which
  `use_chat_template` makes the tokenizer's EOS, so the collators, generation, the EOS rate and the reward read-out
  all share one notion of "ended";
- without one, plain text stays as it is and a conversation is written as an HH transcript ending in
  `"\\n\\nAssistant:"`, its completion prefixed by a space.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant", "tool")
PLAIN_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "PONG"}]

Turns = list[dict[str, Any]]


def is_conversation(value: Any) -> bool:
    """True for a list of turns (a list, or the numpy array of dicts that parquet/arrow hand back)."""
    return isinstance(value, list | tuple | np.ndarray)


def parse_turns(value: Any, where: str) -> Turns:
    """Validate a list of `{role, content}` turns (an assistant turn may carry `tool_calls` instead of content);
    `where` names the file, row and column in errors."""
    if not is_conversation(value) or len(value) == 0:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} turns, got {_show(value)}")
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}: turn {index} is {_show(turn)}, not a {{role, content}} mapping")
        if "role" not in turn or turn["role"] is None:
            raise ValueError(f"{where}: turn {index} has no 'role'; every turn needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise ValueError(f"{where}: turn {index} has unknown role {turn['role']!r}; roles are {', '.join(ROLES)}")
        calls = turn.get("tool_calls") if turn["role"] == "assistant" else None
        if calls is not None and len(calls):
            parsed = {
                "role": "assistant",
                "content": _text(turn.get("content") or "", f"{where}: turn {index} content"),
            }
            turns.append({**parsed, "tool_calls": _tool_calls(calls, f"{where}: turn {index} tool_calls")})
            continue
        if turn.get("content") is None:
            raise ValueError(f"{where}: turn {index} has no 'content'; every turn needs 'role' and 'content'")
        turns.append({"role": turn["role"], "content": _text(turn["content"], f"{where}: turn {index} content")})
    return turns


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's calls in OpenAI's format (`[{"type": "function", "function": {"name", "arguments"}}]`, or
    the function alone), arguments as an object or a JSON string of one; returned with the arguments an object, as
    chat templates render them."""
    if not is_conversation(value):
        raise ValueError(f"{where} is {_show(value)}, not a list of calls")
    calls = []
    for index, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where} call {index} is {_show(call)}; a call needs a function 'name' and 'arguments'")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where} call {index}: arguments {_show(arguments)} are not JSON ({error.msg})"
                ) from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"{where} call {index}: arguments are {_show(arguments)}, not an object")
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}})
    return calls


def has_tools(turns: Turns) -> bool:
    """The conversation calls a tool or carries a tool's answer."""
    return any(turn["role"] == "tool" or "tool_calls" in turn for turn in turns)


def _text(content: Any, where: str) -> str:
    """A turn's content: a string, or OpenAI-style content parts (`[{"type": "text", "text": ...}, ...]`), read as
    their texts joined by newlines (as vLLM joins them). A part that is not text (an image) is an error."""
    if isinstance(content, str):
        return content
    if not is_conversation(content) or not len(content):
        raise ValueError(f"{where} is {_show(content)}, not a string or a list of content parts")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"{where} part {index} is {_show(part)}; only text parts ({{'type': 'text', 'text': ...}}) are read"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def hh_turns(text: str, where: str) -> Turns:
    """An Anthropic-HH dialogue (`"\\n\\nHuman: q\\n\\nAssistant: a"`) as turns."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(
            f"{where}: not an HH dialogue (expected text starting with '\\n\\nHuman:' and "
            f"'\\n\\nAssistant:' turns), got {_show(text)}"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    names, contents = parts[1::2], parts[2::2]
    return [{"role": roles[name], "content": text.strip()} for name, text in zip(names, contents, strict=True)]


def split_last_assistant(turns: Turns, where: str) -> tuple[Turns, str]:
    """(every turn before the last assistant turn, that turn's content)."""
    last = next((i for i in range(len(turns) - 1, -1, -1) if turns[i]["role"] == "assistant"), None)
    if last is None:
        raise ValueError(f"{where}: the conversation has no assistant turn, so it has no completion to learn")
    if last == 0:
        raise ValueError(f"{where}: the conversation starts with its assistant turn, so it has no prompt")
    return turns[:last], turns[last]["content"]


def has_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Turns, tools: list | None = None) -> str:
    """The text a policy is conditioned on: the chat template with its generation prompt (and `tools` offered), or
    plain text."""
    if has_template(tokenizer):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "".join(f"\n\n{PLAIN_NAMES[t['role']]}: {t['content']}" for t in prompt) + "\n\nAssistant:"


def render_completion(tokenizer: PreTrainedTokenizerBase, content: str, *, conversational: bool) -> str:
    """A completion's text: as is under a template (its end-of-turn is the EOS the collators append); an HH
    transcript's assistant turn starts with a space."""
    if conversational and not has_template(tokenizer):
        return " " + content
    return content


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template writes right after an assistant turn's content."""
    head = tokenizer.apply_chat_template(_PROBE[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    if not full.startswith(head) or "PONG" not in full[len(head) :]:
        raise ValueError(
            "model.chat_template: rendering [user, assistant] does not extend the generation prompt of [user]; "
            "the template cannot be used to train on completions"
        )
    tail = full[len(head) :].split("PONG", 1)[1]
    specials = sorted(
        {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(tokenizer.all_special_tokens),
        key=len,
        reverse=True,
    )
    token = next((s for s in specials if tail.startswith(s)), None)
    if token is None:
        raise ValueError(
            f"model.chat_template: the template ends an assistant turn with {tail[:20]!r}, which starts with no "
            "special token; give the tokenizer an end-of-turn special token, or set model.chat_template: none"
        )
    return token


def use_chat_template(tokenizer: PreTrainedTokenizerBase, setting: str) -> PreTrainedTokenizerBase:
    """Resolve `model.chat_template` on a tokenizer (in place): keep, drop or load the template, and make its
    end-of-turn token the EOS every stage appends and stops at."""
    if setting == "none":
        tokenizer.chat_template = None
    elif setting != "auto":
        path = Path(setting)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.chat_template: {setting!r} is not a file; use auto, none, or the path to a Jinja template"
            )
        tokenizer.chat_template = path.read_text()
    if has_template(tokenizer):
        end = end_of_turn_token(tokenizer)
        if end != tokenizer.eos_token:
            tokenizer.eos_token = end
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                f"model.chat_template: the end-of-turn token {end!r} is also the pad token; the reward model reads "
                "its score at the end-of-turn, so pad must differ"
            )
    return tokenizer


def conversation_rows(
    values: Sequence[Any], tokenizer: PreTrainedTokenizerBase, where: str, tools: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Training rows of conversations: `prompt`, `completion`, `turn` (which assistant turn; 0 without tools) and
    `conversation` (its row). A conversation without tools gives its last assistant turn, its prompt the turns before;
    one with tools gives every assistant turn (`tool_rows`), the row's `tools` (a list of schemas or its JSON)
    offered in the prompt."""
    rows = []
    for row, value in enumerate(values):
        at = f"{where} row {row}"
        turns = hh_turns(value, at) if isinstance(value, str) else parse_turns(value, at)
        offered = _tools(tools[row], f"{at} column 'tools'") if tools is not None else None
        if has_tools(turns):
            rows += [{**r, "conversation": row} for r in tool_rows(tokenizer, turns, offered, at)]
            continue
        prompt, content = split_last_assistant(turns, at)
        completion = render_completion(tokenizer, content, conversational=True)
        rows.append({"prompt": render_prompt(tokenizer, prompt, offered), "completion": completion, "turn": 0})
        rows[-1]["conversation"] = row
    return rows


def tool_rows(tokenizer: PreTrainedTokenizerBase, turns: Turns, tools: list | None, where: str) -> list[dict[str, Any]]:
    """One row per assistant turn of a conversation with tools: the history before it rendered with the generation
    prompt, and the turn as the template writes it after that prompt, up to its end-of-turn token (the EOS the
    collators append). Raises ValueError naming `where` when the tokenizer has no template, or when the template
    does not render the turn as an extension of its prompt."""
    if not has_template(tokenizer):
        raise ValueError(
            f"{where}: the conversation has tool calls or tool turns, which only a chat template can render; use a "
            "model whose tokenizer has one, or set model.chat_template to a Jinja file with tool calling"
        )
    rows, eos = [], tokenizer.eos_token
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant" or index == 0:
            continue
        head = tokenizer.apply_chat_template(turns[:index], tools=tools, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns[: index + 1], tools=tools, tokenize=False)
        tail = full[len(head) :]
        if not full.startswith(head) or eos not in tail or not tail.split(eos, 1)[0].strip():
            raise ValueError(
                f"{where}: turn {index}: the chat template does not render the assistant's turn after its generation "
                f"prompt, ended by {eos!r}, so the turn cannot be trained alone"
            )
        rows.append({"prompt": head, "completion": tail.split(eos, 1)[0], "turn": len(rows)})
    return rows


def _tools(value: Any, where: str) -> list | None:
    """A row's `tools`: a list of JSON schemas, or its JSON text; None when empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: {_show(value)} is not JSON ({error.msg})") from None
    if not is_conversation(value) or not all(isinstance(tool, Mapping) for tool in value):
        raise ValueError(f"{where}: {_show(value)} is not a list of tool schemas")
    return [dict(tool) for tool in value] or None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
