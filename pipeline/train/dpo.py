"""DPO training with cached reference log-probs.

`DPOModule` trains the injected policy on pairs that carry the reference's log-probs, cached by the `reference`
stage (`pipeline.models.reference`): no reference model is held or run during training, and a sweep over beta or
the loss variant never repeats them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from pipeline.config import DPOConfig, TrainerConfig
from pipeline.data.batches import PairCollator, PreferencePair, read_pairs
from pipeline.data.schemas import REFERENCE_LOGPS, read_table
from pipeline.losses.dpo import PairLogps, needs_reference, preference_loss
from pipeline.models.reference import attach_reference, pair_lengths, pair_logps
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.optim import build_optimizer
from pipeline.train.sharding import shard
from pipeline.train.trainer import FitResult, fit_and_validate, optim_args


def dpo_rows(pairs_dir: str, reference_dir: str, split: str, tokenizer, cfg: DPOConfig) -> list[PreferencePair]:
    """One split's pairs as DPO trains on them: tokenised, with the `reference` stage's cached log-probs attached
    where `cfg.loss` reads them (`needs_reference`)."""
    rows = read_pairs(pairs_dir, split, tokenizer, cfg.max_length)
    if not needs_reference(cfg.loss):
        return rows
    source = f"{reference_dir}/{split}.parquet"
    return attach_reference(rows, read_table(source, REFERENCE_LOGPS), source)


class DPOModule(pl.LightningModule):
    """DPO-family preference optimisation (`cfg.loss`, `pipeline.losses.dpo.DPO_LOSSES`) of an injected policy,
    against the reference log-probs the batches carry where the loss reads them."""

    def __init__(self, policy: torch.nn.Module, cfg: DPOConfig) -> None:
        super().__init__()
        self.policy, self.cfg = policy, cfg
        self.hyperparameters = {
            "beta": cfg.beta,
            "label_smoothing": cfg.label_smoothing,
            "simpo_gamma": cfg.simpo_gamma,
            "orpo_lambda": cfg.orpo_lambda,
        }
        self.optim_args = optim_args(cfg)

    def _shared_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        policy_chosen_logps, policy_rejected_logps = pair_logps(self.policy, batch)
        chosen_lengths, rejected_lengths = (n.to(policy_chosen_logps) for n in pair_lengths(batch))
        pair = PairLogps(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
        if needs_reference(self.cfg.loss):
            reference_chosen_logps, reference_rejected_logps = batch["reference_logps"].to(policy_chosen_logps).chunk(2)
            pair = dataclasses.replace(
                pair, reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps
            )
        losses, chosen_rewards, rejected_rewards = preference_loss(pair, loss=self.cfg.loss, **self.hyperparameters)
        return {
            "loss": losses.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._shared_step(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({k: v for k, v in out.items() if k != "loss"})
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._shared_step(batch)
        size = batch["index"].numel()
        self.log("val/loss", out["loss"], batch_size=size, sync_dist=True, prog_bar=True)
        self.log_dict({f"val/{k}": v for k, v in out.items() if k != "loss"}, batch_size=size, sync_dist=True)

    def configure_model(self) -> None:
        shard(self)  # under trainer.strategy: fsdp

    def configure_optimizers(self) -> dict:
        return build_optimizer(self.policy, precision=str(self.trainer.precision), **self.optim_args)


def fit_dpo(
    policy,
    tokenizer,
    train: Sequence,
    val: Sequence,
    cfg: DPOConfig,
    trainer: TrainerConfig,
    *,
    seed: int,
    hooks: Hooks = NO_HOOKS,
) -> tuple[DPOModule, FitResult]:
    """A DPO-family loss (`cfg.loss`) on pairs carrying their cached reference log-probs (`attach_reference`;
    reference-free losses read none)."""
    module = DPOModule(policy, cfg)
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    data = RowsDataModule(train, val, collate, cfg.batch_size, seed, accumulate=trainer.accumulate_grad_batches)
    return module, fit_and_validate(module, data, trainer, cfg, hooks)
