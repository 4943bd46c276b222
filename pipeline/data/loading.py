"""Reading datasets through `datasets.load_dataset`: a hub id, or a builder (`json`, `parquet`) on local files.

Shared by `prepare` (prompt/completion data) and `preferences` (human pairs); errors name the params key. Local
JSON files are checked before `datasets` reads them, so a bad file fails with its path and line (an empty file,
bytes that are not UTF-8, a line that is not JSON) rather than with a generic `DatasetGenerationError`.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pandas as pd


def load_table(path: str | None, name: str | None, data_files: str | None, split: str, key: str) -> pd.DataFrame:
    """`datasets.load_dataset(...)` as a DataFrame; `key` names the params key that must hold `path`."""
    import datasets

    if not path:
        raise ValueError(f"{key}: required to read a dataset (a hub id, or a builder such as 'json' / 'parquet')")
    if path == "json" and data_files:
        for file in sorted(glob.glob(data_files)) or [data_files]:
            check_json_file(Path(file))
    try:
        table = datasets.load_dataset(path, name, data_files=data_files, split=split).to_pandas()
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        cause = error.__cause__ or error
        raise ValueError(f"{key}: cannot read {data_files or path!r} (split {split!r}): {cause}") from None
    if table.empty:
        raise ValueError(f"{key}: {data_files or path!r} split {split!r} has no rows; point it at data")
    return table


def check_json_file(path: Path) -> None:
    """A JSON-lines (or one JSON array) file: present, not empty, UTF-8, and every line parses."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; check the data_files key")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path}: the file is empty; it needs one JSON object per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path} line {line}: bytes {raw[error.start : error.end]!r} (byte {error.start}) are not UTF-8; "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    if text.lstrip().startswith("["):
        for index, row in enumerate(_parse(text, path, 0)):
            _require_object(row, path, f"element {index} of its array")
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            _require_object(_parse(line, path, number), path, f"line {number}")


def _parse(text: str, path: Path, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line}" if line else f"line {error.lineno}"
        raise ValueError(
            f"{path} {where}: not valid JSON ({error.msg} at column {error.colno}); fix or remove the line"
        ) from None


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _require_object(row: Any, path: Path, where: str) -> None:
    """A row is a JSON object (its columns by name); `datasets` would otherwise fail without naming the line."""
    if not isinstance(row, dict):
        shown = json.dumps(row)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        kind = _JSON_KINDS.get(type(row), "value")
        raise ValueError(
            f"{path} {where}: {shown} is a JSON {kind}, not an object; each row is one object of columns, e.g. "
            '{"prompt": "...", "completion": "..."}: fix or remove it'
        )


def require_columns(table: pd.DataFrame, wanted: dict[str, str], dataset: str) -> None:
    """Raise naming the params key, the missing column and the columns there are."""
    for key, column in wanted.items():
        if column not in table.columns:
            raise ValueError(
                f"{key}: column {column!r} is not in dataset {dataset!r}; "
                f"its columns are {', '.join(map(str, table.columns))}"
            )


def require_text(table: pd.DataFrame, column: str, key: str, dataset: str) -> None:
    """Every cell of a text column is a string: name the rows that are null, NaN or another type."""
    bad = [i for i, value in enumerate(table[column]) if not isinstance(value, str)]
    if bad:
        shown = ", ".join(f"row {i} ({table[column].iloc[i]!r})" for i in bad[:5])
        raise ValueError(
            f"{dataset} column {column!r} ({key}): {len(bad)} cell(s) are not text: {shown}; fill or drop those rows"
        )
