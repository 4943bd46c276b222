"""`reward`: a Bradley-Terry reward model initialised from the SFT model with a fresh score head."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Config
from pipeline.data.batches import read_pairs
from pipeline.data.tokenization import load_tokenizer
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_reward_model, prepare_for_training
from pipeline.models.lora import merged, parameter_counts
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.reward import RewardStats, fit_reward


@dataclass
class RewardOutcome(Outcome):
    stats: RewardStats | None = None
    """The score distribution on held-out responses, saved beside the model: PPO normalises rewards with it."""


def run_reward(cfg: Config, *, pairs_dir: str, sft_dir: str, hooks: Hooks = NO_HOOKS) -> RewardOutcome | None:
    """Train on the train pairs, validate on val (`reward.ensemble` heads: each head's score distribution saved for
    PPO to normalise it with). None on DDP ranks > 0."""
    rm = cfg.reward
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    rows = {split: read_pairs(pairs_dir, split, tokenizer, rm.max_length) for split in ("train", "val")}
    model = prepare_for_training(
        build_reward_model(cfg.model, tokenizer, sft_dir, heads=rm.ensemble),
        cfg.model,
        cfg.trainer,
        disable_dropout=rm.disable_dropout,
        task="SEQ_CLS",
    )
    counts = parameter_counts(model)
    module, result = fit_reward(
        model,
        tokenizer,
        rows["train"],
        rows["val"],
        rm,
        cfg.trainer,
        seed=cfg.seed,
        hooks=hooks,
    )
    if not result.is_global_zero:
        return None
    metrics = result.metrics
    heads = (
        tuple((metrics[f"val/head{h}/reward_mean"], metrics[f"val/head{h}/reward_std"]) for h in range(rm.ensemble))
        if rm.ensemble > 1
        else ()
    )
    stats = RewardStats(mean=metrics["val/reward_mean"], std=metrics["val/reward_std"], heads=heads)
    return RewardOutcome(
        {**result.metrics, **counts}, result.step, merged(module.model), tokenizer, result.history, stats=stats
    )
