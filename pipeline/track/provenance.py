"""Provenance of a stage run: the machine facts that decide whether two runs can agree bit for bit, and the input
tables (with their DVC md5s) a stage read, for MLflow."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from pipeline.files import dvc_md5
from pipeline.track.tracking import TableInput


def machine_tags() -> dict[str, str]:
    """What decides whether two runs can agree bit for bit: software versions, the processor, threads, and the
    determinism switches. Same values (and params and inputs): identical outputs; see docs/results.md."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "sys.torch": torch.__version__,
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.cpu": cpu,
        "sys.cpu_count": str(os.cpu_count()),
        "sys.threads": str(torch.get_num_threads()),
        "sys.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "sys.cuda": str(torch.version.cuda),
        "sys.deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
        "sys.cudnn_deterministic": str(torch.backends.cudnn.deterministic),
    }


_ARROW_TYPES = {
    "string": "string",
    "large_string": "string",
    "int64": "long",
    "int32": "integer",
    "double": "double",
    "float": "float",
    "bool": "boolean",
}
_CONTEXTS = {"train": "training", "val": "validation", "validation": "validation", "test": "test"}


def input_tables(paths: list[str]) -> list[TableInput]:
    """The parquet tables among a stage's inputs (files, or the tables in input folders), with their DVC md5s."""
    import pyarrow.parquet as pq

    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.suffix == ".parquet" else []
    tables = []
    for file in files:
        meta = pq.ParquetFile(file)
        columns = {f.name: _ARROW_TYPES.get(str(f.type), "string") for f in meta.schema_arrow}
        tables.append(
            TableInput(
                name=f"{file.parent.name}/{file.stem}",
                digest=dvc_md5(file),
                source=str(file),
                columns=columns,
                num_rows=meta.metadata.num_rows,
                context=_CONTEXTS.get(file.stem, file.stem),
            )
        )
    return tables
