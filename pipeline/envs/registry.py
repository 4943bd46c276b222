"""The built-in environments by `env.kind`, and the loader for a user's own."""

from __future__ import annotations

import functools
from collections.abc import Callable

from pipeline.config.named import import_named
from pipeline.envs.base import Environment
from pipeline.envs.calculator import Calculator
from pipeline.envs.dialogue import Dialogue
from pipeline.envs.guess import Guess

BUILTIN: dict[str, Callable[[Dialogue], Environment]] = {"calculator": Calculator, "guess": Guess}


def environment_factory(kind: str, dialogue: Dialogue) -> Callable[[], Environment] | None:
    """A new environment per call for `env.kind`, or None for `none` (single-turn). A built-in speaks through
    `dialogue`; a user's `python:<module>:<Class>` is imported only when named and built with no arguments.
    Raises ValueError naming the key and the fix."""
    if kind == "none":
        return None
    if kind in BUILTIN:
        return functools.partial(BUILTIN[kind], dialogue)
    return import_named(kind, "env.kind", ", ".join(["none", *sorted(BUILTIN)]))
