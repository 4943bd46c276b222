"""Small report writers: metric curves as CSV for `dvc plots`, and sample tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.io import atomic_path


def write_curve(rows: Sequence[dict[str, float]], path: str | Path) -> None:
    """Write per-step metric rows as CSV (one `step` column, one column per metric), atomically."""
    frame = pd.DataFrame(list(rows)) if rows else pd.DataFrame({"step": []})
    if "step" in frame:
        frame = frame.groupby("step", as_index=False).last()
        frame = frame[["step", *sorted(c for c in frame.columns if c != "step")]]
    frame.columns = [c.replace("/", "_") for c in frame.columns]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
