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

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from pipeline.config import RewardConfig, TrainerConfig
from pipeline.data.batches import PairCollator, is_packed
from pipeline.eval.policies import spearman
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
    heads: tuple[tuple[float, float], ...] = ()
    """An ensemble's (mean, std) per head, the first head's being `mean`, `std`; empty for one head."""

    FILE = "reward_stats.json"

    def write(self, model_dir: str | Path) -> None:
        stats = asdict(self)
        if not self.heads:  # one head: the file as it always was
            del stats["heads"]
        write_json(stats, Path(model_dir) / self.FILE)

    @property
    def means(self) -> tuple[float, ...]:
        return tuple(mean for mean, _ in self.heads) or (self.mean,)

    @property
    def stds(self) -> tuple[float, ...]:
        return tuple(std for _, std in self.heads) or (self.std,)

    @classmethod
    def read(cls, model_dir: str | Path) -> RewardStats:
        path = Path(model_dir) / cls.FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: the reward model's score statistics are missing; rerun dvc repro reward")
        stats = json.loads(path.read_text())
        return cls(stats["mean"], stats["std"], tuple(tuple(head) for head in stats.get("heads", ())))


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
    """The classifier's scores of every sequence of a packed batch (`packed_batch`), read at its last token as the
    classifier's own pooling does on a padded batch: the backbone over the packed rows, then the score heads on
    those N positions only. Shape: (N, heads)."""
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
    return head(hidden.flatten(0, 1)[batch["last_token"]])


def bootstrap_weights(shape: torch.Size, seed: int, step: int) -> torch.Tensor:
    """Poisson(1) weights, one per (pair, head) of a step's batch: each head trains on its own bootstrap resample
    of the pairs (in expectation each pair once), drawn from `seed` and `step` alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.poisson(torch.ones(shape), generator=generator)


class RewardModule(pl.LightningModule):
    """Bradley-Terry training of an injected `AutoModelForSequenceClassification`: one score head, or `heads` of an
    ensemble on the shared body, each head's loss over its own bootstrap of the pairs (Poisson(1) weights per pair
    and head, drawn per step from `seed` and the step, so a resumed run draws the same)."""

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
        heads: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim_args = {"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "max_steps": max_steps}
        self.margin, self.center_coef, self.heads, self.seed = margin, center_coef, heads, seed

    def rewards(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of chosen and rejected, each (B, heads), from one forward pass over the 2B sequences."""
        if is_packed(batch):
            return packed_scores(self.model, batch).float().chunk(2)
        scores = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return scores.float().chunk(2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.rewards(batch)
        if self.heads == 1:
            chosen, rejected = chosen[:, 0], rejected[:, 0]
            loss = bradley_terry_loss(chosen, rejected, margin=self.margin, center_coef=self.center_coef).mean()
        else:
            losses = bradley_terry_loss(chosen, rejected, margin=self.margin, center_coef=self.center_coef)
            weights = bootstrap_weights(losses.shape, self.seed, self.global_step).to(losses)
            loss = (weights * losses).sum() / weights.sum().clamp(min=1.0)
            chosen, rejected = chosen[:, 0], rejected[:, 0]  # the accuracy below is the first head's
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (chosen > rejected).float().mean())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val: list[torch.Tensor] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected = self.rewards(batch)
        gold_chosen, gold_rejected = batch["gold"].float().chunk(2)
        self._val.append(torch.cat([chosen, rejected, gold_chosen[:, None], gold_rejected[:, None]], dim=1))

    def on_validation_epoch_end(self) -> None:
        n = self.heads
        rows = self.all_gather(torch.cat(self._val)).reshape(-1, 2 * n + 2)  # (N, [r_c x n, r_r x n, gold_c, gold_r])
        heads_chosen, heads_rejected, gold_chosen, gold_rejected = (
            rows[:, :n],
            rows[:, n : 2 * n],
            rows[:, -2],
            rows[:, -1],
        )
        chosen, rejected = heads_chosen[:, 0], heads_rejected[:, 0]  # the headline figures: the first head's
        loss = bradley_terry_loss(chosen, rejected, margin=self.margin, center_coef=self.center_coef).mean()
        rewards = torch.cat([chosen, rejected])
        metrics = {
            "val/loss": loss,
            "val/accuracy": (chosen > rejected).float().mean(),
            "val/margin": (chosen - rejected).mean(),
            "val/reward_mean": rewards.mean(),
            "val/reward_std": rewards.std(),
        }
        if n > 1:  # each head's score distribution (PPO normalises each with its own) and the ensemble's accuracy
            every = torch.cat([heads_chosen, heads_rejected])
            for head in range(n):  # as the first head's headline figures are computed: the same numbers for it
                scores = torch.cat([heads_chosen[:, head], heads_rejected[:, head]])
                metrics[f"val/head{head}/reward_mean"] = scores.mean()
                metrics[f"val/head{head}/reward_std"] = scores.std()
            standard = (every - every.mean(0)) / every.std(0)
            sc, sr = standard.chunk(2)
            metrics["val/ensemble_accuracy"] = (sc.mean(1) > sr.mean(1)).float().mean()
            metrics["val/ensemble_spread"] = standard.std(1).mean()
        known = ~(gold_chosen.isnan() | gold_rejected.isnan())
        if known.any():
            chosen_k, rejected_k = chosen[known], rejected[known]
            gold_c, gold_r = gold_chosen[known], gold_rejected[known]
            metrics["val/gold_accuracy"] = ((chosen_k > rejected_k) == (gold_c > gold_r)).float().mean()
            metrics["val/gold_spearman"] = torch.tensor(
                spearman(
                    torch.cat([chosen_k, rejected_k]).double().cpu().numpy(),
                    torch.cat([gold_c, gold_r]).double().cpu().numpy(),
                )
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
    module = RewardModule(
        model, margin=cfg.margin, center_coef=cfg.center_coef, heads=cfg.ensemble, seed=seed, **optim_args(cfg)
    )
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    data = RowsDataModule(train, val, collate, cfg.batch_size, seed, accumulate=trainer.accumulate_grad_batches)
    return module, fit_and_validate(module, data, trainer, cfg, hooks)
