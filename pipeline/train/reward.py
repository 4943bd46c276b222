"""The reward model: Bradley-Terry loss and a LightningModule over a one-logit sequence classifier.

The classifier starts from the SFT weights with a fresh score head and reads its reward at the last non-pad
token, which is the EOS that ends every response (pad and EOS are distinct). Chosen and rejected go through one
concatenated forward pass. Validation reports accuracy against the labels, the mean margin, the reward
distribution (PPO normalises with its mean and std), and, where gold scores are known, the accuracy against the
gold order and the Spearman rank correlation between reward and gold judge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from pipeline.config import RewardConfig, TrainerConfig
from pipeline.data.batches import PairCollator, is_packed
from pipeline.files import write_json
from pipeline.models.lora import backbone, root_call, unwrapped
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.optim import build_optimizer
from pipeline.train.sharding import shard
from pipeline.train.trainer import FitResult, fit_and_validate, optim_args


@dataclass(frozen=True)
class RewardStats:
    """The reward model's score distribution on held-out responses, saved beside its weights: PPO normalises the
    scores with it."""

    mean: float
    std: float

    FILE = "reward_stats.json"

    def write(self, model_dir: str | Path) -> None:
        write_json(asdict(self), Path(model_dir) / self.FILE)

    @classmethod
    def read(cls, model_dir: str | Path) -> RewardStats:
        path = Path(model_dir) / cls.FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: the reward model's score statistics are missing; rerun dvc repro reward")
        return cls(**json.loads(path.read_text()))


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, margin: float = 0.0, center_coef: float = 0.0
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss, -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2.

    The margin term follows Llama 2 (Touvron et al. 2023, eq. 2); the centering term Eisenstein et al. 2023.

    Args:
        chosen_rewards: Shape: (B,).
        rejected_rewards: Shape: (B,).

    Returns:
        Shape: (B,).
    """
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_coef:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return loss


def packed_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one-logit classifier's score of every sequence of a packed batch (`packed_batch`), read at its last
    token as the classifier's own pooling does on a padded batch: the backbone over the packed rows, then the score
    head on those N positions only. Shape: (N,)."""
    base = unwrapped(model)
    head = getattr(base, "score", None)
    if head is None:
        raise ValueError(
            f"reward.packing: {type(base).__name__} has no `score` head to read packed sequences with; "
            "set reward.packing: false"
        )
    return root_call(model, _packed_scores, head, batch)


def _packed_scores(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = backbone(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).last_hidden_state  # (R, L, H)
    return head(hidden.flatten(0, 1)[batch["last_token"]])[:, 0]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties) of two 1-D tensors."""
    return float(pd.Series(x.double().cpu().numpy()).corr(pd.Series(y.double().cpu().numpy()), method="spearman"))


class RewardModule(pl.LightningModule):
    """Bradley-Terry training of an injected `AutoModelForSequenceClassification` (num_labels = 1)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        max_steps: int,
        margin: float,
        center_coef: float,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim_args = {"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "max_steps": max_steps}
        self.margin, self.center_coef = margin, center_coef

    def rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of chosen and rejected, each (B,), from one forward pass over the 2B sequences."""
        if is_packed(batch):
            return packed_scores(self.model, batch).float().chunk(2)
        scores = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        return scores.float().chunk(2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, margin=self.margin, center_coef=self.center_coef).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (chosen > rejected).float().mean())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val: list[torch.Tensor] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected = self.rewards(batch)
        gold_chosen, gold_rejected = batch["gold"].float().chunk(2)
        self._val.append(torch.stack([chosen, rejected, gold_chosen, gold_rejected], dim=1))

    def on_validation_epoch_end(self) -> None:
        rows = self.all_gather(torch.cat(self._val)).reshape(-1, 4)  # (N, [r_c, r_r, gold_c, gold_r])
        chosen, rejected, gold_chosen, gold_rejected = rows.unbind(1)
        loss = bradley_terry_loss(chosen, rejected, margin=self.margin, center_coef=self.center_coef).mean()
        rewards = torch.cat([chosen, rejected])
        metrics = {
            "val/loss": loss,
            "val/accuracy": (chosen > rejected).float().mean(),
            "val/margin": (chosen - rejected).mean(),
            "val/reward_mean": rewards.mean(),
            "val/reward_std": rewards.std(),
        }
        known = ~(gold_chosen.isnan() | gold_rejected.isnan())
        if known.any():
            chosen_k, rejected_k = chosen[known], rejected[known]
            gold_c, gold_r = gold_chosen[known], gold_rejected[known]
            metrics["val/gold_accuracy"] = ((chosen_k > rejected_k) == (gold_c > gold_r)).float().mean()
            metrics["val/gold_spearman"] = torch.tensor(
                spearman(torch.cat([chosen_k, rejected_k]), torch.cat([gold_c, gold_r]))
            )
        self.log_dict(metrics)

    def configure_model(self) -> None:
        shard(self)  # under trainer.strategy: fsdp

    def configure_optimizers(self) -> dict:
        return build_optimizer(self.model, precision=str(self.trainer.precision), **self.optim_args)


def fit_reward(
    model,
    tokenizer,
    train: Sequence,
    val: Sequence,
    cfg: RewardConfig,
    trainer: TrainerConfig,
    *,
    seed: int,
    hooks: Hooks = NO_HOOKS,
) -> tuple[RewardModule, FitResult]:
    """A Bradley-Terry reward model on tokenised pairs (`batches.read_pairs`)."""
    module = RewardModule(model, margin=cfg.margin, center_coef=cfg.center_coef, **optim_args(cfg))
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    data = RowsDataModule(train, val, collate, cfg.batch_size, seed, accumulate=trainer.accumulate_grad_batches)
    return module, fit_and_validate(module, data, trainer, cfg, hooks)
