"""A stage's checkpoint folder, part of the stage runtime: so a killed or preempted training stage resumes where it
stopped.

Every `trainer.checkpoint_every_n_steps` optimizer steps (PPO: rollouts), and once more when training ends,
`ResumeCallback` writes a full Lightning checkpoint (weights, optimizers, schedulers, loop progress, callback and
module state) plus the RNG states and the position in the data order, to a temporary name that is then renamed, so a
crash never leaves a half-written file under a checkpoint's name. The end-of-training checkpoint keeps a stage's
training when a later step fails (sampling, a plot, the tracking server): the rerun resumes at the end of training
and trains no step again. The folder is outside the DVC outputs and keyed by the stage's params and the DVC hashes of
its inputs (`checkpoint_key`), so a changed param or input never resumes from a stale checkpoint. On start a stage
resumes from the newest checkpoint that loads (`Checkpoints.latest`; an unreadable one is skipped with a warning and
removed), continues its MLflow run (the run id is kept beside the checkpoint), and skips the rows it already trained
on; once its outputs are written the folder is removed unless `trainer.keep_checkpoints` is set. A resumed stage ends
with the same weights and metrics as an uninterrupted one on the same machine.

The training side (`pipeline.train.resume.ResumeCallback`) sees the folder through `pipeline.train.hooks.
CheckpointFolder`: where to write a checkpoint (`staging`) and how to make it the newest one (`publish`).

A running stage holds its folder (`Checkpoints.hold`, an OS file lock the kernel drops if the process dies). Two
processes running the very same stage at once (queued sweep points that share an upstream stage) would otherwise
resume from, overwrite and delete each other's checkpoints: the second one runs without checkpoints instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from pipeline.files import write_json

PATTERN = "step-*.ckpt"


def checkpoint_key(stage_params: Mapping[str, Any], input_hashes: Mapping[str, str]) -> str:
    """A short hash of what decides a stage's result: its params and the DVC hashes of its inputs."""
    payload = json.dumps({"params": stage_params, "inputs": input_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoints:
    """One stage's checkpoint folder (`<root>/.checkpoints/<stage>/<key>`) and its policy."""

    directory: Path
    every_n: int
    keep: bool

    def latest(self) -> Path | None:
        """The newest checkpoint that loads; unreadable ones are skipped with a warning and removed."""
        for path in sorted(self.directory.glob(PATTERN), reverse=True):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
                return path
            except Exception as error:  # noqa: BLE001 - any unreadable file is skipped, never loaded
                warnings.warn(f"skipping unreadable checkpoint {path} ({type(error).__name__}: {error})", stacklevel=2)
                path.unlink(missing_ok=True)
        return None

    @staticmethod
    def step(checkpoint: Path) -> int:
        """The step (PPO: rollout) a checkpoint was written at."""
        return int(checkpoint.stem.split("-")[1])

    def run_id(self, checkpoint: Path) -> str | None:
        """The MLflow run the checkpointed stage was logging to."""
        return self._sidecar(checkpoint).get("run_id")

    def is_final(self, checkpoint: Path) -> bool:
        """Whether `checkpoint` was written when training ended (resuming from it trains nothing)."""
        return bool(self._sidecar(checkpoint).get("final"))

    @staticmethod
    def _sidecar(checkpoint: Path) -> dict[str, Any]:
        sidecar = checkpoint.with_suffix(".json")
        return json.loads(sidecar.read_text()) if sidecar.exists() else {}

    def staging(self, done: int) -> Path:
        """Where the checkpoint of step `done` is written before it is published (a name `latest` never takes)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f".tmp-step-{done:09d}.ckpt"

    def publish(self, staged: Path, done: int, run_id: str, *, final: bool = False) -> Path:
        """Make the whole file `staged` the checkpoint of step `done` (its run id beside it; `final`: written when
        training ended) and drop the older ones. Rank 0 calls it once every rank has written its part."""
        path = self.directory / f"step-{done:09d}.ckpt"
        write_json({"run_id": run_id, "done": done, "final": final}, path.with_suffix(".json"))
        staged.replace(path)  # the checkpoint appears under its name only once it is whole
        for older in self.directory.glob(PATTERN):
            if older != path:
                older.unlink(missing_ok=True)
                older.with_suffix(".json").unlink(missing_ok=True)
        return path

    def clear(self) -> None:
        """Remove the folder once the stage's outputs are written (unless asked to keep it)."""
        if not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    @contextlib.contextmanager
    def hold(self) -> Iterator[Checkpoints]:
        """Hold the folder while the stage runs; yields these checkpoints, or, when another live process holds them,
        inert ones (no resume, no saves, no clearing) so the two runs never touch each other's files."""
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{self.directory}.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            yield self.inert()
            return
        try:
            yield self
        finally:
            lock.release()

    def inert(self) -> Checkpoints:
        """The same folder with checkpointing off and nothing removed."""
        return dataclasses.replace(self, every_n=0, keep=True)
