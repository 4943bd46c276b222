"""`calculator`: a word problem over a sum of 3 to 5 two-digit numbers, a `calc` tool, the final answer checked.

Each policy turn either calls the tool (`<calc>12+31+7</calc>` answered `<result>50</result>`, or the chat
template's `<tool_call>` answered by a `tool` turn: `pipeline.envs.dialogue`) or answers; an answer ends the episode
with reward 1 when its final number equals the row's `answer` (the `exact` verifier's rule), else 0. Tool calls are
free; a malformed one is answered with an error and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.envs.base import Step
from pipeline.envs.dialogue import Dialogue, PlainTags
from pipeline.envs.tools import CALC, Tool
from pipeline.models.verifiers import exact_score

TOOLS = (CALC,)


class Calculator:
    """One episode of the calculator task (see the module docstring)."""

    def __init__(self, dialogue: Dialogue | None = None, tools: tuple[Tool, ...] = TOOLS) -> None:
        self.dialogue = dialogue if dialogue is not None else PlainTags()
        self.tools, self.answer = tools, ""

    @property
    def stop_texts(self) -> tuple[str, ...]:
        """A turn that calls a tool ends on its call (the tag protocol's closing tag)."""
        return self.dialogue.stop_texts(self.tools)

    def without_tools(self) -> Calculator:
        """The same task with no tool: a call is read as the answer (evaluate's `no_tool` figures)."""
        return Calculator(self.dialogue, tools=())

    def reset(self, row: Mapping[str, Any]) -> str:
        self.answer = str(row["answer"])
        return str(row["prompt"])

    def step(self, action: str) -> Step:
        call = self.dialogue.answer_call(action, {tool.name: tool for tool in self.tools})
        if call is not None:
            return Step(call.observation, tool_call=True, error=call.error)
        return Step(None, reward=exact_score("", action, self.answer), done=True)
