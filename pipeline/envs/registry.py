"""The built-in environments by `env.kind`, and the loader for a user's own."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.envs.base import Environment, environment_class
from pipeline.envs.calculator import Calculator
from pipeline.envs.guess import Guess

BUILTIN: dict[str, Callable[[], Environment]] = {"calculator": Calculator, "guess": Guess}


def environment_factory(kind: str) -> Callable[[], Environment] | None:
    """A new environment per call for `env.kind`, or None for `none` (single-turn)."""
    return environment_class(kind, BUILTIN)
