"""User code named in `params.yaml` as `python:<module>:<name>` (`env.kind`, `judge.verifier`).

The module is imported only when the key names it, from the project root (the folder `dvc repro` runs in), so a
user's environment or check lives beside `params.yaml` and is tracked by Git like the rest of the experiment.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

PREFIX = "python"


def is_named(value: str) -> bool:
    """`value` has the shape `python:<module>:<name>`."""
    parts = value.split(":")
    return len(parts) == 3 and parts[0] == PREFIX and all(parts[1:])


def import_named(value: str, key: str, valid: str) -> Callable[..., Any]:
    """The callable `python:<module>:<name>` names. `key` and `valid` (the key's other values, in words) go into
    the ValueError raised when `value` has another shape, cannot be imported, or is not callable."""
    if not is_named(value):
        raise ValueError(f"{key}: {value!r} is not one of {valid}, python:<module>:<name>")
    _, module, name = value.split(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"{key}: cannot import {name!r} from module {module!r} ({error}); the module must be importable from "
            "the project root"
        ) from None
    if not callable(found):
        raise ValueError(f"{key}: {value!r} is not callable")
    return found
