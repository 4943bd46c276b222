"""DPO training with cached reference log-probs.

`DPOModule` trains the injected policy on pairs that carry the reference's log-probs, cached by the `reference`
stage (`pipeline.models.reference`): no reference model is held or run during training, and a sweep over beta or
the loss variant never repeats them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from pipeline.config import DPOConfig, TrainerConfig
from pipeline.data.batches import PairCollator, PreferencePair, read_pairs
from pipeline.data.loading import load_table
from pipeline.data.schemas import REFERENCE_LOGPS, read_table
from pipeline.data.unpaired import (
    UnpairedCollator,
    UnpairedRow,
    as_kl_pairs,
    check_json_labels,
    dataset_rows,
    read_unpaired,
    unpair,
    with_kl_reference,
)
from pipeline.losses.dpo import PairLogps, UnpairedLogps, is_unpaired, needs_reference, preference_loss
from pipeline.models.reference import attach_reference, pair_lengths, pair_logps, reference_logps
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.optim import build_optimizer
from pipeline.train.sharding import shard
from pipeline.train.trainer import FitResult, fit_and_validate, optim_args


def dpo_rows(
    pairs_dir: str, reference_dir: str, tokenizer, cfg: DPOConfig, *, seed: int
) -> dict[str, list[PreferencePair]] | dict[str, list[UnpairedRow]]:
    """The train and val pairs as DPO trains on them: tokenised, with the `reference` stage's cached log-probs
    attached where `cfg.loss` reads them (`needs_reference`); for KTO, made unpaired (`unpair`,
    `cfg.kto_desirable_fraction` drawn with `seed`) or read from `cfg.kto_dataset`, the reference log-probs the cache
    does not hold still to attach (`kl_reference`)."""
    if cfg.kto_dataset is not None:
        return kto_dataset_rows(tokenizer, cfg, seed=seed)
    splits = {}
    for split in ("train", "val"):
        rows = read_pairs(pairs_dir, split, tokenizer, cfg.max_length)
        if needs_reference(cfg.loss):
            source = f"{reference_dir}/{split}.parquet"
            rows = attach_reference(rows, read_table(source, REFERENCE_LOGPS), source)
        splits[split] = unpair(rows, cfg.kto_desirable_fraction, seed) if is_unpaired(cfg.loss) else rows
    return splits


def kto_dataset_rows(tokenizer, cfg: DPOConfig, *, seed: int) -> dict[str, list[UnpairedRow]]:
    """`dpo.kto_dataset`'s rows, checked (`read_unpaired`), split train/val by prompt with `seed`, tokenised with
    their mismatched responses; every reference log-prob still to attach (`kl_reference`)."""
    source = str(cfg.kto_data_files or cfg.kto_dataset)
    table = load_table(cfg.kto_dataset, None, cfg.kto_data_files, cfg.kto_dataset_split, "dpo.kto_dataset")
    if cfg.kto_dataset == "json" and cfg.kto_data_files:
        check_json_labels(cfg.kto_data_files)
    frame = read_unpaired(table, tokenizer, source)
    prompts = sorted(frame["prompt"].unique())
    if len(prompts) < 4:
        raise ValueError(
            f"{source}: {len(prompts)} distinct prompt(s); KTO needs at least 4 (two per split, for the mismatched "
            "pairs of its KL estimate)"
        )
    np.random.default_rng(seed).shuffle(prompts)
    held = frame["prompt"].isin(set(prompts[: max(2, round(len(prompts) * cfg.kto_val_fraction))]))
    return {
        split: dataset_rows(part.reset_index(drop=True), tokenizer, cfg.max_length, f"{source} ({split})", seed)
        for split, part in (("train", frame[~held]), ("val", frame[held]))
    }


def kl_reference(
    reference: torch.nn.Module, rows: Sequence[UnpairedRow], tokenizer, cfg: DPOConfig
) -> list[UnpairedRow]:
    """KTO's rows with the reference's log-probs of their mismatched responses, scored by `reference` (the SFT
    weights, before training) with the collation DPO trains with. They depend on the pairing, which depends on
    `dpo.kto_desirable_fraction`, so the stage computes them rather than the `reference` stage; the responses'
    own come from the `reference` stage's cache, except a `dpo.kto_dataset`'s, scored here too."""
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    frame = reference_logps(reference, as_kl_pairs(rows), collate, cfg.batch_size)
    own = frame["reference_chosen_logps"].tolist() if cfg.kto_dataset is not None else None  # in no cache
    return with_kl_reference(rows, frame["reference_rejected_logps"].tolist(), own)


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
            "kto_lambda_d": cfg.kto_lambda_d,
            "kto_lambda_u": cfg.kto_lambda_u,
        }
        self.optim_args = optim_args(cfg)

    def _shared_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if is_unpaired(self.cfg.loss):
            return self._unpaired_step(batch)
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

    def _unpaired_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """KTO: the rows' responses and their mismatched responses scored in one forward pass (`UnpairedCollator`).
        Per-label means are over the batch's rows of that label (0 where it has none)."""
        policy_logps, policy_kl_logps = pair_logps(self.policy, batch)
        reference_logps, reference_kl_logps = batch["reference_logps"].to(policy_logps).chunk(2)
        desirable = batch["desirable"].bool()
        rows = UnpairedLogps(policy_logps, policy_kl_logps, reference_logps, reference_kl_logps, desirable)
        losses, rewards, kl = preference_loss(rows, loss=self.cfg.loss, **self.hyperparameters)
        chosen, rejected = desirable.to(rewards), (~desirable).to(rewards)
        return {
            "loss": losses.mean(),
            "rewards/desirable": (rewards * chosen).sum() / chosen.sum().clamp(min=1),
            "rewards/undesirable": (rewards * rejected).sum() / rejected.sum().clamp(min=1),
            "kl": kl[0],
            "desirable_share": chosen.mean(),
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
    reference-free losses read none), or KTO on unpaired rows (`kl_reference` attached)."""
    module = DPOModule(policy, cfg)
    if is_unpaired(cfg.loss):
        collate = UnpairedCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    else:
        collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    data = RowsDataModule(train, val, collate, cfg.batch_size, seed, accumulate=trainer.accumulate_grad_batches)
    return module, fit_and_validate(module, data, trainer, cfg, hooks)
