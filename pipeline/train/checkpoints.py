"""Mid-stage checkpoints, so a killed or preempted training stage resumes where it stopped.

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

A running stage holds its folder (`Checkpoints.hold`, an OS file lock the kernel drops if the process dies). Two
processes running the very same stage at once (queued sweep points that share an upstream stage) would otherwise
resume from, overwrite and delete each other's checkpoints: the second one runs without checkpoints instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from filelock import FileLock, Timeout

if TYPE_CHECKING:
    import pytorch_lightning as pl

PATTERN = "step-*.ckpt"


class Resumable(Protocol):
    """Whatever hands out training batches: told, before iterating, where in the data order to restart."""

    def resume_from(self, epoch: int, consumed: int) -> None: ...


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

    def save(self, trainer: pl.Trainer, done: int, run_id: str, *, final: bool = False) -> Path:
        """Write `step-<done>.ckpt` atomically (and its run id; `final`: written when training ended), then drop the
        older ones. Every process calls it: Lightning's save is collective (a sharded strategy gathers the state, and
        every rank waits at its barrier); rank 0 writes the files."""
        path = self.directory / f"step-{done:09d}.ckpt"
        tmp = self.directory / f".tmp-{path.name}"
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if not trainer.is_global_zero:
            return path
        path.with_suffix(".json").write_text(json.dumps({"run_id": run_id, "done": done, "final": final}))
        tmp.replace(path)  # the checkpoint appears under its name only once it is whole
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


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, samplers), in a `weights_only`-loadable form."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
