"""`calculator`: a word problem over a sum of 3 to 5 two-digit numbers, a `<calc>` tool, the final answer checked.

Each policy turn either calls the tool (`<calc>12+31+7</calc>`, answered `<result>50</result>`) or answers; an
answer ends the episode with reward 1 when its final number (the verifiers' answer rule) equals the row's `answer`,
else 0. Tool calls are free; a malformed one is answered with an error (`pipeline.envs.tools`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.envs.base import Step
from pipeline.envs.tools import answer_call, calculate

TOOLS = {"calc": calculate}


def final_number(text: str) -> str | None:
    """The last integer in `text` (the answer rule of the `exact` verifier, for integers)."""
    digits, current = [], ""
    for char in text + " ":
        if char.isdigit():
            current += char
        elif current:
            digits.append(current)
            current = ""
    return digits[-1] if digits else None


class Calculator:
    """One episode of the calculator task (see the module docstring)."""

    stop_texts = ("</calc>",)  # a turn that calls the tool ends on its closing tag

    def __init__(self, tools: Mapping[str, Any] = TOOLS) -> None:
        self.tools, self.answer = dict(tools), ""

    @classmethod
    def without_tools(cls) -> Calculator:
        """The same task with no tool: a call is read as the answer (evaluate's `no_tool` figures)."""
        return cls(tools={})

    def reset(self, row: Mapping[str, Any]) -> str:
        self.answer = str(row["answer"])
        return str(row["prompt"])

    def step(self, action: str) -> Step:
        call = answer_call(action, self.tools)
        if call is not None:
            return Step(call.observation, tool_call=True, error=call.error)
        got = final_number(action)
        return Step(None, reward=float(got is not None and int(got) == int(self.answer)), done=True)
