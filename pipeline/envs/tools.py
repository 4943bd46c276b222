"""Tools an environment offers the policy, and the one built in: `calc`, integer arithmetic.

A tool takes one string argument (`Tool.parameter`) and returns its result as text, or raises ValueError naming
what it refuses. How a call is written and answered is the dialogue's business (`pipeline.envs.dialogue`): the
`<calc>12+7</calc>` tag protocol for a model without a chat template, the template's own `<tool_call>{json}
</tool_call>` for a chat model. Either way a malformed call is answered as an error observation, never raised.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameter: str
    """The name of its one string argument (`expression`)."""
    run: Callable[[str], str]

    def schema(self) -> dict[str, Any]:
        """The tool as chat templates read it (`apply_chat_template(..., tools=[...])`, OpenAI's function format)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": {self.parameter: {"type": "string"}},
                    "required": [self.parameter],
                },
            },
        }


@dataclass(frozen=True)
class ToolAnswer:
    """The observation that answers a call (the result, or `error: ...`), and why it was malformed, if it was."""

    observation: str
    error: str | None = None


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> str:
    """Integer `+`, `-` and `*` over literals, with parentheses: what `calc` evaluates. Anything else raises
    ValueError naming it (no names, calls or attributes are ever evaluated)."""
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    return str(_evaluate(tree.body))


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    raise ValueError(f"unsupported {ast.unparse(node)!r}: only integers with + - * and parentheses")


CALC = Tool("calc", "Evaluate integer arithmetic: + - * and parentheses.", "expression", calculate)
