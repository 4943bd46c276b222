"""Atomic output writing and content hashes.

Every artifact a stage hands to DVC is written beside its final path and renamed into place, so a crash never
leaves a half-written file or directory that DVC could cache. `dvc_md5` computes the same content hash DVC 3
records in `dvc.lock` (plain md5 for a file; for a directory, md5 of its sorted JSON listing plus `.dir`), so a
stage can tag its MLflow run with the hashes of what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to fill (file or directory); on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(obj: Any, path: str | Path) -> None:
    """Write pretty, key-sorted JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(text: str, path: str | Path) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a DataFrame as parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_splits(splits: Mapping[str, pd.DataFrame], directory: str | Path) -> None:
    """Write `<directory>/<split>.parquet` for every split, the directory as a whole atomically."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        for name, frame in splits.items():
            frame.to_parquet(tmp / f"{name}.parquet", index=False)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC 3 records for `path` in dvc.lock (`<md5>` for a file, `<md5>.dir` for a directory)."""
    path = Path(path)
    if not path.is_dir():
        return _file_md5(path)
    entries = sorted(
        (
            {"md5": _file_md5(file), "relpath": file.relative_to(path).as_posix()}
            for file in path.rglob("*")
            if file.is_file()
        ),
        key=lambda entry: entry["relpath"],
    )
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"
