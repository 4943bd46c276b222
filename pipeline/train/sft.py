"""Supervised fine-tuning: a LightningModule with completion-only loss.

The loss is the mean negative log-likelihood of the completion tokens and the one EOS that ends them; prompt
and pad tokens are masked out (the collator builds `loss_mask`). Under gradient accumulation the mean runs over
the whole effective batch's tokens, not per micro-batch. The network is injected, so the same module trains a
scratch GPT-2 or any hub causal LM.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from pipeline.config import SFTConfig, TrainerConfig
from pipeline.data.batches import SFTCollator
from pipeline.models.logprobs import model_token_logps
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.optim import build_optimizer
from pipeline.train.sharding import shard
from pipeline.train.trainer import FitResult, fit_and_validate, optim_args


def completion_nll(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL over the masked (completion + EOS) tokens of the batch.

    Args:
        token_logps: next-token log-probs. Shape: (B, T - 1).
        loss_mask: Shape: (B, T); 1 on tokens that are targets.

    Returns:
        (loss, number of target tokens), both scalars.
    """
    mask = loss_mask[:, 1:].float()  # (B, T-1): token t+1 is predicted at t
    n_tokens = mask.sum()
    return -(token_logps * mask).sum() / n_tokens.clamp(min=1), n_tokens


class SFTModule(pl.LightningModule):
    """Completion-only language-model fine-tuning of an injected causal LM."""

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float, warmup_steps: int, max_steps: int):
        super().__init__()
        self.model = model
        self.optim_args = {
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "max_steps": max_steps,
        }

    def _shared_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logps, _ = model_token_logps(
            self.model, batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids")
        )  # set by a packed batch
        return completion_nll(logps, batch["loss_mask"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._shared_step(batch)
        self.log("train/loss", loss, prog_bar=True)
        if "group_weight" in batch:
            # Gradient accumulation: weight by this micro-batch's share of the effective batch's target tokens, so
            # k accumulated micro-batches give the gradient of one token-mean over all of them (Lightning divides
            # the returned loss by k).
            return loss * n_tokens / batch["group_weight"] * self.trainer.accumulate_grad_batches
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_totals = torch.zeros(2, device=self.device)  # [summed NLL, target tokens]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self._shared_step(batch)
        self._val_totals += torch.stack([loss.detach() * n_tokens, n_tokens])

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole val set and all ranks, whatever the batch sizes.
        nll_sum, n_tokens = self.trainer.strategy.reduce(self._val_totals, reduce_op="sum")
        loss = nll_sum / n_tokens.clamp(min=1)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", torch.exp(loss.clamp(max=50.0)))

    def configure_model(self) -> None:
        shard(self)  # under trainer.strategy: fsdp

    def configure_optimizers(self) -> dict:
        return build_optimizer(self.model, precision=str(self.trainer.precision), **self.optim_args)


def fit_sft(
    model,
    tokenizer,
    train: Sequence,
    val: Sequence,
    cfg: SFTConfig,
    trainer: TrainerConfig,
    *,
    seed: int,
    hooks: Hooks = NO_HOOKS,
) -> tuple[SFTModule, FitResult]:
    """Completion-only SFT of `model` on tokenised rows (`batches.tokenize_rows`)."""
    module = SFTModule(model, **optim_args(cfg))
    collate = SFTCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    data = RowsDataModule(
        train,
        val,
        collate,
        cfg.batch_size,
        seed,
        accumulate=trainer.accumulate_grad_batches,
        weight=lambda row: len(row.completion_ids) + 1,
    )
    return module, fit_and_validate(module, data, trainer, cfg, hooks)
