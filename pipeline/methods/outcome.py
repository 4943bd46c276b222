"""What a method's run gives back to its stage (`Outcome`); what it gets from it is `pipeline.train.hooks.Hooks`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch


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
        curves: more per-step metric rows, by name (`monitor`: the proxy-versus-gold monitor's measurements).
        tags: MLflow tags for the stage's run and the pipeline's parent run (a tripped gate).
    """

    metrics: dict[str, float]
    step: int = 0
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    splits: dict[str, pd.DataFrame] = field(default_factory=dict)
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
