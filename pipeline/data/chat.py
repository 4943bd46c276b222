"""Conversations and chat templates: reading `{role, content}` turns, and rendering prompts the way a model expects.

A conversation is a list of turns, each a mapping with a `role` (`system`, `user`, `assistant`) and a string
`content`. Wherever a conversation becomes training data, the *prompt* is every turn before the last assistant turn
and the *completion* is that turn's content. Anthropic-HH dialogues (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`) are
read as conversations too.

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

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
PLAIN_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "PONG"}]

Turns = list[dict[str, str]]


def is_conversation(value: Any) -> bool:
    """True for a list of turns (a list, or the numpy array of dicts that parquet/arrow hand back)."""
    return isinstance(value, list | tuple | np.ndarray)


def parse_turns(value: Any, where: str) -> Turns:
    """Validate a list of `{role, content}` turns; `where` names the file, row and column in errors."""
    if not is_conversation(value) or len(value) == 0:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} turns, got {_show(value)}")
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise ValueError(f"{where}: turn {index} is {_show(turn)}, not a {{role, content}} mapping")
        for key in ("role", "content"):
            if key not in turn or turn[key] is None:
                raise ValueError(f"{where}: turn {index} has no {key!r}; every turn needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise ValueError(f"{where}: turn {index} has unknown role {turn['role']!r}; roles are {', '.join(ROLES)}")
        turns.append({"role": turn["role"], "content": _text(turn["content"], f"{where}: turn {index} content")})
    return turns


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


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Turns) -> str:
    """The text a policy is conditioned on: the chat template with its generation prompt, or plain text."""
    if has_template(tokenizer):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
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


def conversation_prompts(
    values: Sequence[Any], tokenizer: PreTrainedTokenizerBase, where: str
) -> tuple[list[str], list[str]]:
    """Rendered prompts and completions of conversations (turn lists or HH dialogue strings), row by row."""
    prompts, completions = [], []
    for row, value in enumerate(values):
        at = f"{where} row {row}"
        turns = hh_turns(value, at) if isinstance(value, str) else parse_turns(value, at)
        prompt, content = split_last_assistant(turns, at)
        prompts.append(render_prompt(tokenizer, prompt))
        completions.append(render_completion(tokenizer, content, conversational=True))
    return prompts, completions


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
