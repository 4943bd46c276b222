"""Online (iterative) DPO: rounds of sample, label, train, in one Lightning fit (`dpo.online_rounds`).

A round is one training epoch of `dpo.max_steps` / `dpo.online_rounds` steps (`steps_per_round`). At its start the
current policy samples `dpo.online_k` responses to each of the round's fresh prompts, a `Labeller` scores them as
PPO composes a score (`pipeline.losses.rewards.response_scores`: the reward model, the judge, the missing-EOS
penalty), and each prompt's highest- and lowest-scored responses make its pair (`best_worst_pairs`); the reference
(the SFT weights) scores the pairs once, and the round trains on them. The policy's own sampled tokens are the pair,
never a re-tokenisation of their text.

Resuming: one optimizer and schedule run through every round, so the stage's ordinary mid-stage checkpoint (written at
every round's end too: `EveryRound`) holds all that an exact resume needs, with the current round's pairs in it
(`RoundsDataModule.state_dict`): a run killed in round 2 resumes in round 2 at its step, trains on the same pairs, and
ends with the weights an uninterrupted run ends with. Each round but the last is measured at its end (`Measure`, on
the validation prompts: gold, KL to SFT, win-rate against SFT) and logged to MLflow as `round/*`; the stage measures
the last after training.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.config import DPOConfig, TrainerConfig
from pipeline.data.batches import LengthGroupedBatchSampler, PairCollator, PreferencePair
from pipeline.eval.policies import reward_scores, sampled_objective, win_rate
from pipeline.losses.rewards import RewardWeights, response_scores
from pipeline.models.generation import SamplingParams, sample, sample_ids
from pipeline.models.judges import Judge
from pipeline.models.lora import as_reference
from pipeline.models.reference import reference_logps
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.dpo import DPOModule
from pipeline.train.hooks import NO_HOOKS, CheckpointFolder, Hooks
from pipeline.train.reward import RewardStats
from pipeline.train.trainer import FitResult, fit_and_validate

ROUND_SEED = 7919
"""Round r samples with seed `seed + ROUND_SEED * (r + 1)`."""


def best_worst_pairs(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    scores: Sequence[float],
    golds: Sequence[float],
    k: int,
    *,
    min_gap: float = 0.0,
) -> tuple[list[PreferencePair], dict[str, float]]:
    """Each prompt's pair: its highest-scored response chosen, its lowest rejected (the first of equals, in sample
    order). A prompt whose best and worst differ by `min_gap` or less (0: a tie), or whose two are the same tokens,
    gives none.

    Args:
        prompt_ids: one per sample; each prompt's `k` samples are consecutive.
        completions: the sampled response tokens (no EOS).
        scores: what ranks them (`response_scores`).
        golds: the gold judge's scores, kept on the pair.

    Returns:
        The pairs and `pairs`, `ties`, `score_gap` (mean best - worst over the pairs).
    """
    if len(prompt_ids) % k:
        raise ValueError(f"{len(prompt_ids)} samples are not whole groups of k = {k}")
    pairs, ties, gaps = [], 0, []
    for start in range(0, len(prompt_ids), k):
        group = np.asarray(scores[start : start + k], dtype=float)
        best, worst = start + int(np.argmax(group)), start + int(np.argmin(group))
        if group.max() - group.min() <= min_gap or list(completions[best]) == list(completions[worst]):
            ties += 1
            continue
        gaps.append(group.max() - group.min())
        pairs.append(
            PreferencePair(
                list(prompt_ids[start]),
                list(completions[best]),
                list(completions[worst]),
                float(golds[best]),
                float(golds[worst]),
                len(pairs),
            )
        )
    stats = {"pairs": float(len(pairs)), "ties": float(ties), "score_gap": float(np.mean(gaps)) if gaps else 0.0}
    return pairs, stats


def labelling_weights(cfg: DPOConfig, stats: RewardStats) -> RewardWeights:
    """How a round's responses are scored: the `dpo.online_*` weights, the reward model's saved normalisation (each
    head's, for an ensemble, whose heads are averaged), no clipping."""
    return RewardWeights(
        reward_mean=stats.mean,
        reward_std=stats.std,
        reward_model_weight=cfg.online_reward_model_weight,
        head_means=stats.means if stats.heads else (),
        head_stds=stats.stds if stats.heads else (),
        judge_weight=cfg.online_judge_weight,
        missing_eos_penalty=cfg.online_missing_eos_penalty,
    )


@dataclass
class Labeller:
    """Makes round r's pairs from the current policy: samples, scores, best against worst, reference log-probs.

    `reference` None: the LoRA policy with its adapters off. `reward_model` None: no reward model is run (its weight
    is 0)."""

    tokenizer: Any
    prompt_ids: Sequence[Sequence[int]]
    reference: torch.nn.Module | None
    reward_model: torch.nn.Module | None
    judge: Judge
    weights: RewardWeights
    cfg: DPOConfig
    seed: int
    batch_size: int = 256

    def prompts(self, round_index: int) -> list[list[int]]:
        size = self.cfg.online_prompts
        return [list(p) for p in self.prompt_ids[round_index * size : (round_index + 1) * size]]

    @torch.no_grad()
    def __call__(self, policy: torch.nn.Module, round_index: int) -> tuple[list[PreferencePair], dict[str, float]]:
        cfg, tokenizer = self.cfg, self.tokenizer
        params = SamplingParams(cfg.max_new_tokens, 1.0, 0, 1.0, key="dpo.max_new_tokens")
        repeated = [p for p in self.prompts(round_index) for _ in range(cfg.online_k)]
        seed = self.seed + ROUND_SEED * (round_index + 1)
        samples = sample_ids(policy, tokenizer, repeated, params, batch_size=self.batch_size, seed=seed)
        ids = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id, "batch_size": self.batch_size}
        raw = reward_scores(self.reward_model, samples, heads=True, **ids) if self.reward_model is not None else None
        golds = self.judge.score(tokenizer.batch_decode(repeated), samples.texts)
        ended = torch.tensor(samples.ended)
        scores, _ = response_scores(raw, torch.tensor(golds, dtype=torch.float), ended, self.weights)
        pairs, stats = best_worst_pairs(
            repeated, samples.completion_ids, scores.tolist(), golds, cfg.online_k, min_gap=cfg.online_min_gap
        )
        # as the preferences stage drops them (on_invalid: drop): a pair over dpo.max_length, counted
        kept = [pair for pair in pairs if len(pair) <= cfg.max_length]
        stats["too_long"] = float(len(pairs) - len(kept))
        pairs = [dataclasses.replace(pair, index=i) for i, pair in enumerate(kept)]
        if not pairs:
            raise ValueError(
                f"dpo.online_rounds: round {round_index + 1}'s {len(repeated) // cfg.online_k} prompts gave no pair: "
                f"{stats['ties']:.0f} tied (their {cfg.online_k} samples scored within dpo.online_min_gap = "
                f"{cfg.online_min_gap}), {stats['too_long']:.0f} over dpo.max_length = {cfg.max_length}; raise "
                "dpo.online_k or lower dpo.online_min_gap, or raise dpo.max_length (with reference.max_length)"
            )
        collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
        was_training = policy.training
        with as_reference(policy, self.reference) as reference:
            cached = reference_logps(reference, pairs, collate, self.batch_size)
        policy.train(was_training)
        logps = zip(cached["reference_chosen_logps"], cached["reference_rejected_logps"], strict=True)
        pairs = [
            dataclasses.replace(pair, reference_chosen_logps=float(c), reference_rejected_logps=float(r))
            for pair, (c, r) in zip(pairs, logps, strict=True)
        ]
        stats.update(
            {
                "score_mean": float(scores.mean()),
                "gold_mean": float(np.mean(golds)),
                "eos_rate": float(np.mean(samples.ended)),
                "chosen_gold": float(np.mean([p.chosen_gold for p in pairs])),
                "rejected_gold": float(np.mean([p.rejected_gold for p in pairs])),
            }
        )
        return pairs, stats


@dataclass
class Measure:
    """A policy on fixed validation prompts: `objective/*` (`sampled_objective`: KL to the reference, gold) and
    `objective/win_rate`, its gold against the reference's samples of the same prompts and seed."""

    tokenizer: Any
    prompts: Sequence[str]
    reference: torch.nn.Module | None
    judge: Judge
    max_new_tokens: int
    seed: int
    baseline: list[float] = dataclasses.field(default_factory=list)

    @torch.no_grad()
    def __call__(self, policy: torch.nn.Module) -> tuple[dict[str, float], Any]:
        if not self.baseline:  # the reference's samples, drawn as `sampled_objective` draws them
            params = SamplingParams(self.max_new_tokens, 1.0, 0, 1.0, key="dpo.max_new_tokens")
            with as_reference(policy, self.reference) as reference:
                drawn = sample(reference, self.tokenizer, self.prompts, params, batch_size=256, seed=self.seed)
            self.baseline = self.judge.score(self.prompts, drawn.texts)
        metrics, samples = sampled_objective(
            policy,
            self.reference,
            self.tokenizer,
            self.prompts,
            self.judge,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )
        metrics["objective/win_rate"] = win_rate(self.judge.score(self.prompts, samples.texts), self.baseline)
        return metrics, samples


ROUND_MEASURES = {
    "objective/gold_scores": "gold_score",
    "objective/kl": "kl",
    "objective/win_rate": "win_rate",
    "objective/eos_rate": "val_eos_rate",
}
"""How a round's measurement is named in MLflow (`round/<name>`) and the stage's report (`round<r>/<name>`)."""


def round_measures(metrics: dict[str, float]) -> dict[str, float]:
    """A `Measure`'s metrics under their round names (`ROUND_MEASURES`)."""
    return {name: metrics[key] for key, name in ROUND_MEASURES.items()}


class RoundSampler(Sampler[list]):
    """Exactly `steps` x `accumulate` micro-batches of a round's pairs: `LengthGroupedBatchSampler` passes, one after
    another (a new seeded order each), cut there; `skip` leaves out the first ones (a resumed round)."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, steps: int, accumulate: int, rank: int, world: int
    ) -> None:
        self.inner = LengthGroupedBatchSampler(
            lengths, batch_size, seed, accumulate=accumulate, rank=rank, world_size=world
        )
        self.total, self.skip = steps * accumulate, 0

    def __iter__(self) -> Iterator[list]:
        self.inner.epoch = 0  # the same passes every time
        passes = itertools.chain.from_iterable(iter(self.inner) for _ in itertools.count())
        batches = itertools.islice(passes, self.total)
        skip, self.skip = self.skip, 0
        yield from itertools.islice(batches, skip, None)

    def __len__(self) -> int:
        return self.total


def pack_pairs(pairs: Sequence[PreferencePair]) -> dict[str, torch.Tensor]:
    """Pairs as a few flat tensors (a checkpoint loadable with `weights_only=True`)."""
    fields = ("prompt_ids", "chosen_ids", "rejected_ids")
    packed = {f: torch.tensor([t for p in pairs for t in getattr(p, f)], dtype=torch.long) for f in fields}
    packed.update({f"{f}_lengths": torch.tensor([len(getattr(p, f)) for p in pairs], dtype=torch.long) for f in fields})
    floats = ("chosen_gold", "rejected_gold", "reference_chosen_logps", "reference_rejected_logps")
    packed["floats"] = torch.tensor([[getattr(p, f) for f in floats] for p in pairs], dtype=torch.float64)
    return packed


def unpack_pairs(packed: dict[str, torch.Tensor]) -> list[PreferencePair]:
    """`pack_pairs` undone."""
    columns = []
    for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
        flat = packed[field].tolist()
        bounds = np.cumsum([0, *packed[f"{field}_lengths"].tolist()])
        columns.append([flat[a:b] for a, b in itertools.pairwise(bounds)])
    rows = zip(*columns, packed["floats"].tolist(), strict=True)
    return [PreferencePair(p, c, r, cg, rg, i, rc, rr) for i, (p, c, r, (cg, rg, rc, rr)) in enumerate(rows)]


class RoundsDataModule(RowsDataModule):
    """Serves round r's pairs as training epoch r, made at the epoch's start by `make_round(r)` (unless a resumed
    checkpoint holds them), `steps` optimizer steps each; validation on fixed pairs. Each round's labelling
    statistics are logged (`round/*`) and kept (`rounds`)."""

    def __init__(
        self,
        make_round: Callable[[int], tuple[list[PreferencePair], dict[str, float]]],
        val_rows: Sequence,
        collate: Callable,
        batch_size: int,
        seed: int,
        *,
        steps: int,
        accumulate: int = 1,
    ) -> None:
        super().__init__([], val_rows, collate, batch_size, seed, accumulate=accumulate)
        self.make_round, self.steps = make_round, steps
        self.round, self.pairs, self.stats = -1, [], {}
        self.rounds: list[dict[str, float]] = []  # every round's labelling statistics
        self._skip = 0

    def resume_from(self, epoch: int, consumed: int) -> None:
        self._skip = consumed  # the restored pairs are this epoch's (`load_state_dict`)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        current = trainer.current_epoch
        if current != self.round:
            self.pairs, self.stats = self.make_round(current)
            self.round = current
            self.rounds.append({"round": float(current + 1), **self.stats})
            if trainer.is_global_zero and trainer.logger:
                trainer.logger.log_metrics({f"round/{k}": v for k, v in self.stats.items()}, step=trainer.global_step)
        sampler = RoundSampler(
            [len(p) for p in self.pairs],
            self.batch_size,
            self.seed + current,
            self.steps,
            self.accumulate,
            trainer.global_rank,
            trainer.world_size,
        )
        sampler.skip, self._skip = self._skip, 0
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.pairs, batch_sampler=sampler, collate_fn=self.collate, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "pairs": pack_pairs(self.pairs), "rounds": self.rounds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round, self.pairs = state_dict["round"], unpack_pairs(state_dict["pairs"])
        self.rounds = [dict(r) for r in state_dict["rounds"]]


class OnlineDPOModule(DPOModule):
    """`DPOModule` that measures the policy at the end of each round but the last (`measure`, rank 0, the global RNG
    left as it was) and keeps the measurements (`rounds`) in its checkpoints."""

    def __init__(self, policy: torch.nn.Module, cfg: DPOConfig, measure: Measure | None) -> None:
        super().__init__(policy, cfg)
        self.measure = measure
        self.rounds: list[dict[str, float]] = []

    def on_train_epoch_end(self) -> None:
        done = self.current_epoch + 1
        if self.measure is None or done >= self.cfg.online_rounds:
            return
        if self.trainer.is_global_zero:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                metrics, _ = self.measure(self.policy)
            row = {"round": float(done), "step": float(self.global_step), **round_measures(metrics)}
            self.rounds = [r for r in self.rounds if r["round"] != done] + [row]
            if self.logger:
                self.logger.log_metrics({f"round/{k}": v for k, v in round_measures(metrics).items()}, self.global_step)
        self.trainer.strategy.barrier()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["online_rounds"] = self.rounds

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rounds = [dict(r) for r in checkpoint.get("online_rounds", [])]


@dataclass(frozen=True)
class EveryRound:
    """The stage's checkpoint folder with `every_n` no longer than a round: every round's end is checkpointed, and
    within a round the stage's own cadence when it is finer."""

    folder: CheckpointFolder
    round_steps: int

    @property
    def directory(self) -> Path:
        return self.folder.directory

    @property
    def every_n(self) -> int:
        return min(self.folder.every_n, self.round_steps) if self.folder.every_n else 0

    def staging(self, done: int) -> Path:
        return self.folder.staging(done)

    def publish(self, staged: Path, done: int, run_id: str, *, final: bool = False) -> Path:
        return self.folder.publish(staged, done, run_id, final=final)


def steps_per_round(cfg: DPOConfig) -> int:
    """`dpo.max_steps` split evenly over the rounds (the remainder left out): online DPO trains as many steps as
    offline DPO does, on fresh pairs each round."""
    return cfg.max_steps // cfg.online_rounds


def fit_online_dpo(
    policy: torch.nn.Module,
    tokenizer,
    labeller: Labeller,
    measure: Measure | None,
    val: Sequence[PreferencePair],
    cfg: DPOConfig,
    trainer: TrainerConfig,
    *,
    seed: int,
    hooks: Hooks = NO_HOOKS,
) -> tuple[OnlineDPOModule, RoundsDataModule, FitResult]:
    """`cfg.online_rounds` rounds of `steps_per_round(cfg)` steps, one warm-up and cosine schedule over them all;
    checkpoints at every round's end at least (`EveryRound`)."""
    steps = steps_per_round(cfg)
    total = dataclasses.replace(cfg, max_steps=steps * cfg.online_rounds)
    module = OnlineDPOModule(policy, total, measure)
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=cfg.packing)
    data = RoundsDataModule(
        lambda r: labeller(module.policy, r),
        val,
        collate,
        cfg.batch_size,
        seed,
        steps=steps,
        accumulate=trainer.accumulate_grad_batches,
    )
    if hooks.checkpoints is not None:
        hooks = dataclasses.replace(hooks, checkpoints=EveryRound(hooks.checkpoints, steps))
    result = fit_and_validate(module, data, trainer, total, hooks, reload_dataloaders=True)
    return module, data, result
