"""The Lightning Trainer every training stage uses, and the callbacks that measure it.

`build_trainer` maps the `trainer` params block (accelerator, devices, strategy, precision, num_nodes) onto a
`pytorch_lightning.Trainer`, so `strategy: ddp` with `devices: 2`, FSDP or bf16 on GPUs need no code change.
`Throughput` counts real (non-pad) tokens and time and reports `perf/tokens_per_s` (validation left out),
`perf/steady_tokens_per_s` (the first step left out too), `perf/wall_s` and `perf/peak_rss_mb`; `History` keeps
every logged scalar per step for the stage's DVC plot.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from pipeline.config import TrainerConfig, TrainingConfig
from pipeline.data.batches import is_packed
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.resume import checkpointing
from pipeline.train.sharding import build_strategy, gather


def build_trainer(
    cfg: TrainerConfig,
    *,
    max_steps: int,
    val_every_n_steps: int | None,
    grad_clip: float,
    logger: Any,
    callbacks: Sequence[pl.Callback] = (),
    max_epochs: int = -1,
    accumulate_grad_batches: int = 1,
    reload_dataloaders: bool = False,
) -> pl.Trainer:
    """A Trainer configured from the `trainer` params block; no checkpoints (the stage saves the model).

    `max_steps` and `val_every_n_steps` count optimizer steps; with `accumulate_grad_batches` k, validation runs
    every k * val_every_n_steps micro-batches. (PPO optimises manually and accumulates itself: it passes 1.)
    `reload_dataloaders`: ask the datamodule for a new training loader every epoch (online DPO's rounds).
    """
    return pl.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=build_strategy(cfg),
        precision=cfg.precision,
        num_nodes=cfg.num_nodes,
        max_steps=max_steps,
        max_epochs=max_epochs,
        val_check_interval=val_every_n_steps * accumulate_grad_batches if val_every_n_steps else None,
        accumulate_grad_batches=accumulate_grad_batches,
        reload_dataloaders_every_n_epochs=int(reload_dataloaders),
        check_val_every_n_epoch=None if val_every_n_steps else 1,
        num_sanity_val_steps=0,
        gradient_clip_val=grad_clip or None,
        log_every_n_steps=cfg.log_every_n_steps,
        logger=logger,
        # A bar redrawn every step costs ~8 % of a small model's step time; redraw at the logging interval.
        callbacks=[TQDMProgressBar(refresh_rate=cfg.log_every_n_steps), *callbacks],
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=cfg.accelerator == "cpu",
        # Each loader shards itself (`RowsDataModule`, PPO's per-rank prompt batches): the position a checkpoint
        # records is then the same on every rank, where Lightning's own sampler restarts a resumed epoch at its start.
        use_distributed_sampler=False,
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_tokens_default(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-pad tokens in a batch (pairs: chosen and rejected together); stays on device, so no sync."""
    if is_packed(batch):  # its attention mask is the 4D block-diagonal one
        return batch["token_mask"].sum()
    return batch["attention_mask"].sum()


class Throughput(pl.Callback):
    """Counts non-pad tokens per training step (no host sync in the loop) and times the fit.

    `perf/tokens_per_s` is over the training time: the fit's wall time (`perf/wall_s`) less its validation runs
    (`perf/val_s`). `perf/steady_tokens_per_s` also leaves out the first step, which pays the warm-up (lazy
    initialisation, CUDA context and kernel autotuning, compilation): on a short GPU run that step can be most of
    the time. It is absent after a single step."""

    def __init__(self, count_tokens: Any = None) -> None:
        self.count_tokens = count_tokens or count_tokens_default
        self.tokens: torch.Tensor | None = None
        self.slots = 0  # every position of every input tensor, real or pad: the denominator of padding efficiency
        self.summary: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tokens = torch.zeros((), dtype=torch.long, device=pl_module.device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.validating, self.batches = 0.0, 0
        self.first_step: tuple[float, torch.Tensor] | None = None  # (training seconds, tokens) after batch one
        self._start = _clock(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = _clock(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation inside the fit only (a `trainer.validate` after it, or after a fit with nothing left to train,
        # is no part of the training time).
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validating += _clock(pl_module) - self._validation_start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        self.tokens += self.count_tokens(batch)
        self.slots += batch["input_ids"].numel()
        self.batches += 1
        if self.batches == 1:
            self.first_step = (_clock(pl_module) - self._start - self.validating, self.tokens.clone())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wall = _clock(pl_module) - self._start
        training = wall - self.validating
        tokens = self._total(trainer, self.tokens)
        slots = self._total(trainer, torch.tensor(self.slots, device=pl_module.device))
        self.summary = {
            "perf/tokens_per_s": tokens / training,
            "perf/tokens": tokens,
            "perf/wall_s": wall,
            "perf/val_s": self.validating,
            "perf/peak_rss_mb": peak_rss_mb(),
            "perf/padding_efficiency": tokens / max(slots, 1.0),
        }
        if self.batches > 1:  # as many on every process, so each joins the reduction
            first_seconds, first_tokens = self.first_step
            self.summary["perf/steady_tokens_per_s"] = (tokens - self._total(trainer, first_tokens)) / (
                training - first_seconds
            )
        if torch.cuda.is_available():
            self.summary["perf/peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(self.summary, step=trainer.global_step)

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"summary": self.summary}  # a stage resumed at the end of training trains (and measures) nothing

    def load_state_dict(self, state_dict: dict[str, dict[str, float]]) -> None:
        self.summary = dict(state_dict["summary"])

    @staticmethod
    def _total(trainer: pl.Trainer, count: torch.Tensor) -> float:
        """`count` summed over every process."""
        return float(trainer.strategy.reduce(count.float(), reduce_op="sum"))


def _clock(pl_module: pl.LightningModule) -> float:
    """Seconds on the host clock once the module's device has finished its queued work (CUDA runs ahead)."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
    return time.perf_counter()


class History(pl.Callback):
    """Every scalar the module logged, per global step (rank 0), for DVC plots."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"rows": self.rows}  # a resumed stage's curve keeps the rows logged before it stopped

    def load_state_dict(self, state_dict: dict[str, list[dict[str, float]]]) -> None:
        self.rows = list(state_dict["rows"])

    def _record(self, trainer: pl.Trainer, prefix: str) -> None:
        if not trainer.is_global_zero:
            return
        row = {"step": float(trainer.global_step)}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and value.numel() == 1:
                row[key] = float(value)
        if len(row) > 1:
            self.rows.append(row)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._record(trainer, "train/")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run before the module's epoch-end hook that logs val metrics.
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._record(trainer, "val/")


def optim_args(cfg: TrainingConfig) -> dict[str, float | int]:
    """The optimizer keyword arguments every training module takes, from its stage config."""
    return {
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "warmup_steps": cfg.warmup_steps,
        "max_steps": cfg.max_steps,
    }


@dataclass(frozen=True)
class FitResult:
    """What a stage needs after training: final metrics, the per-step history, the step, and the rank."""

    metrics: dict[str, float]
    history: list[dict[str, float]]
    step: int
    is_global_zero: bool


def fit_and_validate(
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    trainer_cfg: TrainerConfig,
    cfg: TrainingConfig,
    hooks: Hooks = NO_HOOKS,
    *,
    reload_dataloaders: bool = False,
) -> FitResult:
    """Train for `cfg.max_steps`, validate once more at the end, and collect val/*, train/loss and perf/* metrics.

    Args:
        hooks: the stage's logger, checkpoint folder and the checkpoint to resume from.
        reload_dataloaders: a new training loader every epoch (`build_trainer`).
    """
    checkpoints = checkpointing(hooks, data, accumulate=trainer_cfg.accumulate_grad_batches)
    throughput, history = Throughput(), History()
    callbacks = [throughput, history, *([checkpoints] if checkpoints is not None else []), *hooks.callbacks]
    trainer = build_trainer(
        trainer_cfg,
        max_steps=cfg.max_steps,
        val_every_n_steps=cfg.val_every_n_steps,
        grad_clip=cfg.grad_clip,
        logger=hooks.logger,
        callbacks=callbacks,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        reload_dataloaders=reload_dataloaders,
    )
    trainer.fit(module, datamodule=data, ckpt_path=hooks.resume_from, weights_only=True)
    trainer.validate(module, datamodule=data, verbose=False)
    gather(module)  # under FSDP: rank 0's module holds plain, trained models again
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    metrics.update(throughput.summary)
    metrics["train/loss"] = next((r["train/loss"] for r in reversed(history.rows) if "train/loss" in r), float("nan"))
    return FitResult(metrics, history.rows, trainer.global_step, trainer.is_global_zero)
