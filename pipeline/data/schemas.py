"""Data contracts: a pandera schema for every table that crosses a stage boundary.

Tables are validated when written and when read (`validate_frame`), and a violation raises `DataContractError`
naming the file, each failing column and check, and the first failing rows, so a user can find them.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa


class DataContractError(ValueError):
    """A table broke its schema; the message names file, columns, checks and rows."""


_non_empty = pa.Check.str_length(min_value=1, error="must be a non-empty string")
_non_blank = pa.Check(lambda s: s.str.strip().str.len() > 0, element_wise=False, error="must not be blank")

PROMPT_COMPLETION = pa.DataFrameSchema(
    {
        "prompt": pa.Column(str, [_non_empty, _non_blank]),
        "completion": pa.Column(str, [_non_empty, _non_blank]),
        "gold": pa.Column(float, nullable=True),
        # the reference answer a verifier judge checks responses against (`prepare.answer_column`), when there is one
        "answer": pa.Column(str, [_non_empty, _non_blank], required=False),
        # multi-turn demonstrations (`pipeline.tasks.tools`): which policy turn of its episode a row shows (0: the
        # first, whose prompt is the episode's first observation; later ones carry the history in their prompt)
        "turn": pa.Column(int, pa.Check.ge(0), required=False),
    },
    strict=True,
    name="prompt_completion",
)


def validate_frame(frame: pd.DataFrame, schema: pa.DataFrameSchema, source: str) -> pd.DataFrame:
    """Validate `frame` against `schema`; raise `DataContractError` naming `source` and the failing rows."""
    try:
        return schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        raise DataContractError(_describe(errors.failure_cases, schema.name, source)) from None


def read_table(path: str, schema: pa.DataFrameSchema) -> pd.DataFrame:
    """Read a parquet table and validate it."""
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it (dvc repro)") from None
    return validate_frame(frame, schema, path)


def _describe(cases: pd.DataFrame, schema_name: str | None, source: str) -> str:
    lines = [f"{source}: {len(cases)} value(s) break the {schema_name} schema:"]
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        rows = [int(i) for i in group["index"].dropna().tolist()]
        shown = ", ".join(map(str, rows[:10])) + (f" (+{len(rows) - 10} more)" if len(rows) > 10 else "")
        if rows:
            lines.append(f"  column {column!r} fails {check}: rows {shown}")
        else:  # table-level checks (unknown or missing columns) report the offending values instead of rows
            values = ", ".join(map(str, group["failure_case"].tolist()[:10]))
            lines.append(f"  table fails {check}: {values}")
    return "\n".join(lines)


PREFERENCE_PAIRS = pa.DataFrameSchema(
    {
        "prompt": pa.Column(str, _non_empty),
        "chosen": pa.Column(str, [_non_empty, _non_blank]),
        "rejected": pa.Column(str, [_non_empty, _non_blank]),
        "chosen_gold": pa.Column(float, nullable=True),
        "rejected_gold": pa.Column(float, nullable=True),
        "answer": pa.Column(str, [_non_empty, _non_blank], required=False),  # the prompt's, with a verifier judge
    },
    checks=pa.Check(lambda f: f["chosen"] != f["rejected"], error="chosen must differ from rejected"),
    strict=True,
    name="preference_pairs",
)


REFERENCE_LOGPS = pa.DataFrameSchema(
    {
        "index": pa.Column(int, [pa.Check.ge(0)], unique=True),
        "reference_chosen_logps": pa.Column(float, pa.Check.le(0.0)),
        "reference_rejected_logps": pa.Column(float, pa.Check.le(0.0)),
    },
    strict=True,
    name="reference_logps",
)
