"""Reading datasets through `datasets.load_dataset`: a hub id, or a builder (`json`, `parquet`) on local files.

Shared by `prepare` (prompt/completion data) and `preferences` (human pairs); errors name the params key.
"""

from __future__ import annotations

import pandas as pd


def load_table(path: str | None, name: str | None, data_files: str | None, split: str, key: str) -> pd.DataFrame:
    """`datasets.load_dataset(...)` as a DataFrame; `key` names the params key that must hold `path`."""
    import datasets

    if not path:
        raise ValueError(f"{key}: required to read a dataset (a hub id, or a builder such as 'json' / 'parquet')")
    return datasets.load_dataset(path, name, data_files=data_files, split=split).to_pandas()


def require_columns(table: pd.DataFrame, wanted: dict[str, str], dataset: str) -> None:
    """Raise naming the params key, the missing column and the columns there are."""
    for key, column in wanted.items():
        if column not in table.columns:
            raise ValueError(
                f"{key}: column {column!r} is not in dataset {dataset!r}; "
                f"its columns are {', '.join(map(str, table.columns))}"
            )
