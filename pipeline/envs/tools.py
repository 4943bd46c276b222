"""Tool calls through text, for models without a chat template: the tag protocol.

The policy writes `<calc>12+7</calc>`; the closing tag is a stop token of the turn (`closing_tags`), so the turn
ends on it and the environment answers `<result>19</result>`. A malformed call is answered, never raised: a closing
tag with no opening one, an empty call, arguments the tool refuses, a tool that raises: each comes back as
`<result>error: ...</result>` with the reason, and is counted.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"


def opening(name: str) -> str:
    return f"<{name}>"


def closing(name: str) -> str:
    return f"</{name}>"


def tag_tokens(names: list[str]) -> list[str]:
    """Every tag of the protocol for these tools: what a tokenizer learns as single tokens."""
    return [tag for name in names for tag in (opening(name), closing(name))] + [RESULT_OPEN, RESULT_CLOSE]


@dataclass(frozen=True)
class ToolAnswer:
    observation: str
    error: str | None = None


def answer_call(action: str, tools: Mapping[str, Callable[[str], str]]) -> ToolAnswer | None:
    """The observation for `action` when it ends with a tool's closing tag (None: no tool call)."""
    stripped = action.rstrip()
    name = next((name for name in tools if stripped.endswith(closing(name))), None)
    if name is None:
        return None
    body = stripped[: -len(closing(name))]
    start = body.rfind(opening(name))
    if start < 0:
        return _error(f"{closing(name)} without {opening(name)}")
    arguments = body[start + len(opening(name)) :].strip()
    if not arguments:
        return _error(f"empty {opening(name)} call")
    try:
        return ToolAnswer(f"{RESULT_OPEN}{tools[name](arguments)}{RESULT_CLOSE}")
    except Exception as error:  # noqa: BLE001 - a tool that raises is the policy's malformed call, answered
        return _error(f"{name}: {error}")


def _error(reason: str) -> ToolAnswer:
    return ToolAnswer(f"{RESULT_OPEN}error: {reason}{RESULT_CLOSE}", reason)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> str:
    """Integer `+`, `-` and `*` over literals, with parentheses: what `<calc>` evaluates. Anything else raises
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
