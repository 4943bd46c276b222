"""`ResumeCallback`: the Lightning side of mid-stage checkpoints. The folder they go to is the stage runtime's
(`stages.checkpoints`), seen here as a `pipeline.train.hooks.CheckpointFolder`; `checkpointing` builds the callback
from a training run's `Hooks`.

Under several processes one checkpoint holds what every rank needs to go on exactly: the weights and optimizer state
(gathered from the shards under FSDP, re-sharded on load), the position in the data order (the same on every rank:
each loader shards one shared order) and each rank's own RNG states, gathered when it is written. It is resumed by as
many processes as wrote it, or refused.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.train.hooks import CheckpointFolder, Hooks, Resumable


class ResumeCallback(pl.Callback):
    """Checkpoints every `checkpoints.every_n` steps (or rollouts) and when training ends; restores RNG states and the
    data position.

    Args:
        data: the datamodule or sampler to tell where to restart.
        accumulate: micro-batches per optimizer step (steps count optimizer steps).
        unit: `steps` (optimizer steps, automatic optimisation) or `rollouts` (one training batch each: PPO).
        run_id: the MLflow run the checkpoint belongs to.
    """

    def __init__(
        self,
        checkpoints: CheckpointFolder,
        data: Resumable,
        *,
        accumulate: int = 1,
        unit: str = "steps",
        run_id: str = "",
    ) -> None:
        self.checkpoints, self.data, self.accumulate = checkpoints, data, accumulate
        self.unit, self.run_id = unit, run_id
        self._saved = self._last = 0
        self._pending_rng: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        return "ResumeCallback"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _done(self, trainer: pl.Trainer, batch_idx: int) -> int:
        return batch_idx + 1 if self.unit == "rollouts" else trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        done = self._last = self._done(trainer, idx)
        if not self.checkpoints.every_n or not done or done % self.checkpoints.every_n or done == self._saved:
            return
        self._saved = done
        self._save(trainer, done)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the fit's last validation too: a rerun after a later step failed restores everything and trains nothing.
        if self.checkpoints.every_n and self._last:
            self._save(trainer, self._last, final=True)

    def _save(self, trainer: pl.Trainer, done: int, *, final: bool = False) -> None:
        self._position = (trainer.current_epoch, self._consumed(trainer, done))
        self._rng = _every_rank(trainer, rng_states())  # dropout and sampling draw differently on each rank
        staged = self.checkpoints.staging(done)
        trainer.save_checkpoint(staged)  # on every rank: the save is collective (FSDP gathers the shards)
        if trainer.is_global_zero:
            self.checkpoints.publish(staged, done, self.run_id, final=final)
        trainer.strategy.barrier()  # no rank goes on before rank 0 published it

    def _consumed(self, trainer: pl.Trainer, done: int) -> int:
        """Training batches of the current epoch already used."""
        if self.unit == "rollouts":
            return done
        return done * self.accumulate - trainer.current_epoch * int(trainer.num_training_batches)

    def state_dict(self) -> dict[str, Any]:
        epoch, consumed = getattr(self, "_position", (0, 0))
        return {"rng": getattr(self, "_rng", None) or [rng_states()], "epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["rng"]
        states = states if isinstance(states, list) else [states]  # written by one process before ranks kept theirs
        trainer = self._trainer
        assert trainer is not None, "Lightning restores callback state after setup"
        if len(states) != trainer.world_size:
            raise ValueError(
                f"{self.checkpoints.directory}: its checkpoint was written by {len(states)} process(es) and this run "
                f"has {trainer.world_size} (trainer.devices x trainer.num_nodes); each rank's place in the data and "
                f"its random state are kept for the processes that wrote it. Resume with {len(states)} process(es), "
                f"or delete {self.checkpoints.directory} to start the stage over"
            )
        self._pending_rng = states[trainer.global_rank]
        self.data.resume_from(state_dict["epoch"], state_dict["consumed"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        # Restored here, not at load: creating the data iterator draws from the torch RNG in between.
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None


def checkpointing(hooks: Hooks, data: Resumable, *, accumulate: int = 1, unit: str = "steps") -> ResumeCallback | None:
    """The mid-stage checkpointing callback of a training run, or None when its stage keeps no checkpoints."""
    if hooks.checkpoints is None or not hooks.checkpoints.every_n:
        return None
    return ResumeCallback(hooks.checkpoints, data, accumulate=accumulate, unit=unit, run_id=hooks.run_id)


def _every_rank(trainer: pl.Trainer, state: Any) -> list[Any]:
    """`state` of every process, in rank order (a collective: every rank calls it)."""
    if trainer.world_size == 1:
        return [state]
    import torch.distributed as dist

    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, state)
    return gathered


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
