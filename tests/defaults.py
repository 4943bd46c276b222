"""The project root and the default params, as the tests read them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def default_section(section: str, **overrides: Any) -> Any:
    """The `section` config (`dpo`, `ppo`, ...) of the project's params.yaml, with `overrides` replaced."""
    from pipeline.config import load_config, read_params

    return dataclasses.replace(getattr(load_config(read_params(ROOT / "params.yaml")), section), **overrides)
