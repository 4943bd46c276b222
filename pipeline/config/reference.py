"""`docs/params.md`, generated from the config fields themselves: each key's type, bound and the docstring under its
field, so a knob is documented in one place (a test fails when the committed page is stale)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pipeline.config.loader import type_hints
from pipeline.config.sections import Config, is_runtime

INTRO = """# params.yaml reference

Every key of `params.yaml`, section by section: its type, the range it must lie in, its value in the embedded
default, and what it does. Generated from the config fields (`pipeline/config/sections.py`) by `make docs`; do not
edit by hand. An unknown, missing, ill-typed or out-of-range key stops every stage with an error naming it.
"""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (and of its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(base):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(base))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def params_reference(defaults: Mapping[str, Any]) -> str:
    """The Markdown reference; `defaults` is the parsed embedded `params.yaml`."""
    lines = [INTRO]
    sections = {
        "": Config,
        **{
            f.name: type_hints(Config)[f.name]
            for f in dataclasses.fields(Config)
            if dataclasses.is_dataclass(type_hints(Config)[f.name])
        },
    }
    for name, cls in sections.items():
        values = defaults.get(name, {}) if name else defaults
        lines += [
            f"## {name or 'top level'}",
            "",
            "| key | type | range | default | what it does |",
            "|---|---|---|---|---|",
        ]
        docs, hints = field_docs(cls), type_hints(cls)
        for item in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[item.name]):
                continue
            key = f"{name}.{item.name}" if name else item.name
            doc = ("*Runtime, in no stage's cache key.* " if is_runtime(item) else "") + docs.get(item.name, "")
            row = [
                f"`{key}`",
                _type(hints[item.name]),
                item.metadata.get("bound", ""),
                _value(values.get(item.name)),
                doc.replace("|", "\\|"),
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _type(kind: Any) -> str:
    if get_origin(kind) is Literal:
        return " \\| ".join(f"`{option}`" for option in get_args(kind))
    if get_origin(kind) in (Union, types.UnionType):
        return " or ".join("null" if option is type(None) else _type(option) for option in get_args(kind))
    return kind.__name__


def _value(value: Any) -> str:
    return "null" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"
