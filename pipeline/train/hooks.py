"""The seam between a stage's runtime and its training: what a `fit_*` gets from the stage that runs it, as one value.

The runtime (`stages/common.py`) owns the MLflow run, the checkpoint folder and the process's rank; training owns
the Trainer and its callbacks. A `fit_*` takes `Hooks` whole and builds its own checkpointing callback from them
(`pipeline.train.resume.checkpointing`); nothing in `pipeline/` calls back into the runtime. This module imports no
Lightning: the stages that train nothing build `Hooks` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class CheckpointFolder(Protocol):
    """Where a stage's mid-stage checkpoints go (`stages.checkpoints.Checkpoints`)."""

    directory: Path
    every_n: int
    """Steps (PPO: rollouts) between checkpoints; 0: none."""

    def staging(self, done: int) -> Path:
        """Where the checkpoint of step `done` is written first, under a name a resume never takes."""
        ...

    def publish(self, staged: Path, done: int, run_id: str, *, final: bool = False) -> Path:
        """Make the whole file `staged` the newest checkpoint (rank 0, once every rank has written its part)."""
        ...


class Resumable(Protocol):
    """Whatever hands out training batches: told, before iterating, where in the data order to restart."""

    def resume_from(self, epoch: int, consumed: int) -> None: ...


@dataclass(frozen=True)
class Hooks:
    """The runtime side of a training run. The default: no logging, no checkpoints, rank 0."""

    logger: Any = False
    """The Lightning logger bound to the stage's MLflow run (False: none)."""
    checkpoints: CheckpointFolder | None = None
    """The stage's checkpoint folder (None, or `every_n` 0: no mid-stage checkpoints)."""
    run_id: str = ""
    """The MLflow run a checkpoint belongs to (a resumed stage continues it)."""
    resume_from: str | None = None
    """The checkpoint this run continues from."""
    rank: int = 0
    callbacks: Sequence[Any] = ()
    """More Lightning callbacks for the Trainer (a probe of a test, a user's own monitor)."""


NO_HOOKS = Hooks()
