"""What a method's run gets from its stage (`Hooks`) and gives back to it (`Outcome`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch


@dataclass(frozen=True)
class Hooks:
    """The runtime side of a training run, owned by the stage: where its Trainer logs, how it checkpoints, the
    checkpoint it continues from, and this process's rank. The default: no logging, no checkpoints, rank 0."""

    logger: Any = False
    resume: Callable[..., Any] | None = None
    """`(data, unit="steps") -> callback | None` (`pipeline.train.trainer.ResumeFactory`)."""
    ckpt_path: str | None = None
    rank: int = 0


NO_HOOKS = Hooks()


@dataclass
class Outcome:
    """Everything a stage writes after a method ran. None of it is on disk yet: the stage writes it atomically.

    Attributes:
        metrics: the stage's DVC metrics file and its MLflow metrics.
        step: the training step the metrics belong to (0 for a stage that does not train).
        model, tokenizer: the model to save (LoRA adapters already merged) and its tokenizer.
        history: per-step metric rows, the stage's `dvc plots` curve.
        tables: MLflow tables, by artifact file (`samples/sft_val_samples.json`).
        splits: the stage's parquet outputs, by split name.
    """

    metrics: dict[str, float]
    step: int = 0
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    splits: dict[str, pd.DataFrame] = field(default_factory=dict)
