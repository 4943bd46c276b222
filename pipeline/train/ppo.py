"""Online RL from the reward model: rollouts, rewards with a KL penalty, and clipped policy updates (PPO and the
critic-free estimators GRPO, Dr. GRPO, RLOO and REINFORCE++).

Each training step is one rollout batch. The policy samples `num_generations` responses per prompt (KV cache,
stopping at EOS); one no-grad forward pass of each model then gives the old log-probs (policy), reference log-probs
(SFT model), values (the value model, initialised from the reward model; GAE only) and scores (reward model, read at
the response's last token, normalised with the reward model's saved mean and std). Per-token rewards are the score at
the last response token minus `kl_coef` times the per-token KL estimate (`kl_in: reward`), or the score alone with a
k3 KL term of weight `kl_loss_coef` in the loss (`kl_in: loss`, as GRPO does); `pipeline.losses.rl.estimate_advantages`
turns them into advantages. Then `ppo_epochs` passes of shuffled minibatches update the policy (and the value model)
with manual optimisation. The math lives in `pipeline.losses.rl`; this module wires it and refuses to continue when
training turns unhealthy (`PPOHealthError`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from pipeline.config import PPOConfig, TrainerConfig
from pipeline.data.batches import response_batch
from pipeline.envs.episodes import EpisodeSpec, episode_batch, episode_stats, run_episodes
from pipeline.eval.gates import monitor_metrics
from pipeline.losses.rewards import RewardWeights, shape_rewards
from pipeline.losses.rl import (
    GROUP_ESTIMATORS,
    LOSS_AGGREGATION,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    estimate_advantages,
    kl_estimate,
    masked_mean,
)
from pipeline.models.generation import Samples, SamplingParams, sample_ids
from pipeline.models.judges import Judge, VerifierJudge
from pipeline.models.logprobs import model_token_logps
from pipeline.models.lora import as_reference, backbone, unwrapped
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.monitor import MonitorSpec, Watch
from pipeline.train.optim import build_optimizer
from pipeline.train.resume import checkpointing
from pipeline.train.trainer import build_trainer


class PPOHealthError(RuntimeError):
    """PPO stopped because training became unhealthy; the message names the cause and the params to look at."""


class PromptBatches(Sampler[list[int]]):
    """`n_batches` seeded batches of prompt indices, reshuffling whenever the prompts run out."""

    def __init__(self, n_prompts: int, batch_size: int, n_batches: int, seed: int) -> None:
        self.n_prompts, self.batch_size, self.n_batches, self.seed = n_prompts, batch_size, n_batches, seed
        self.skip = 0

    def resume_from(self, epoch: int, consumed: int) -> None:
        """Leave out the first `consumed` rollout batches (a resumed stage); the order itself is unchanged."""
        self.skip = consumed

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        pool: list[int] = []
        skip, self.skip = self.skip, 0
        for index in range(self.n_batches):
            while len(pool) < self.batch_size:
                pool += torch.randperm(self.n_prompts, generator=generator).tolist()
            if index >= skip:
                yield pool[: self.batch_size]
            pool = pool[self.batch_size :]

    def __len__(self) -> int:
        return self.n_batches


def token_values(value_model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values from a sequence classifier: its score head on every hidden state. Shape: (B, T)."""
    hidden = backbone(value_model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return unwrapped(value_model).score(hidden)[..., 0].float()  # under LoRA: PEFT's trainable copy of the head


@dataclass
class Rollout:
    """One rollout batch, token-aligned: (B, T - 1) tensors score the token after each position. `values` and
    `returns` exist only with a value model (GAE)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def summarize_history(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """The stage's report from the per-rollout metrics: `final/*` over the last tenth of training, `start/*` of
    the headline objectives over the first tenth, and the median throughput."""
    frame = pd.DataFrame(list(history))
    window = max(1, len(frame) // 10)
    metrics = {f"final/{k}": float(frame[k].tail(window).mean()) for k in frame.columns if k != "step"}
    metrics.update(
        {
            f"start/{k}": float(frame[k].head(window).mean())
            for k in ("objective/gold_scores", "objective/scores", "objective/kl")
        }
    )
    metrics["perf/tokens_per_s"] = float(frame["perf/tokens_per_s"].median())
    return metrics


class PPOModule(pl.LightningModule):
    """Clipped policy-gradient RL with a frozen reference and a frozen reward model; a separate value model for GAE.

    `reference` None: the policy is a LoRA model and its adapter-disabled self is the reference (one weight copy).
    `value_model` None: a critic-free estimator (`cfg.advantage_estimator` other than gae); no value model exists.
    `compiled_sampling`: rollouts decode with a static KV cache and a compiled step (`generation.compile`).
    `monitor`: the proxy-versus-gold monitor and its gates (`pipeline.train.monitor`), or None.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        value_model: torch.nn.Module | None,
        reference: torch.nn.Module | None,
        reward_model: torch.nn.Module | None,
        judge: Judge,
        tokenizer,
        cfg: PPOConfig,
        *,
        reward_mean: float,
        reward_std: float,
        seed: int,
        reward_heads: Sequence[tuple[float, float]] = (),
        accumulate: int = 1,
        compiled_sampling: bool = False,
        episodes: EpisodeSpec | None = None,
        monitor: MonitorSpec | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.value_model = policy, value_model
        self.reference = reference.requires_grad_(False).eval() if reference is not None else None
        self.reward_model = reward_model.requires_grad_(False).eval() if reward_model is not None else None
        self.judge, self.tokenizer, self.cfg, self.seed = judge, tokenizer, cfg, seed
        self.reward_weights = RewardWeights(
            reward_mean=reward_mean,
            reward_std=reward_std,
            reward_clip=cfg.reward_clip,
            reward_model_weight=cfg.reward_model_weight,
            head_means=tuple(mean for mean, _ in reward_heads),
            head_stds=tuple(std for _, std in reward_heads),
            combine=cfg.ensemble_combine,
            std_coef=cfg.ensemble_std_coef,
            judge_weight=cfg.judge_weight,
            env_weight=episodes.reward_weight if episodes is not None else 0.0,
            missing_eos_penalty=cfg.missing_eos_penalty,
        )
        self.accumulate, self.compiled_sampling, self.episodes = accumulate, compiled_sampling, episodes
        # Dr. GRPO's constant per-row denominator: the most policy tokens a row can hold
        self.max_tokens = episodes.budgets.total_tokens if episodes is not None else cfg.max_new_tokens
        if (value_model is None) != (cfg.advantage_estimator != "gae"):
            raise ValueError(
                f"ppo.advantage_estimator {cfg.advantage_estimator!r}: a value model is needed by gae and only by gae"
            )
        self.aggregation = LOSS_AGGREGATION[cfg.advantage_estimator]
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.kl_control == "adaptive"
            else FixedKLController(cfg.kl_coef)
        )
        self.history: list[dict[str, float]] = []
        self.last_samples: list[dict[str, object]] = []
        self.watch = Watch(monitor) if monitor is not None else None

    def _sequences(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, token-aligned response mask) of the rollout, on the device."""
        batch = response_batch(
            samples.prompt_ids,
            samples.completion_ids,
            samples.ended,
            eos_id=self.tokenizer.eos_token_id,
            pad_id=self.tokenizer.pad_token_id,
        )
        batch = {key: value.to(self.device) for key, value in batch.items()}
        return batch["input_ids"], batch["attention_mask"], batch["loss_mask"][:, 1:].float()

    def _logps(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model_token_logps(
            model, input_ids, attention_mask, temperature=self.cfg.temperature, with_entropy=with_entropy
        )

    def _reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The reward model's raw scores: (B,), or (B, heads) for an ensemble; None when no reward model is run
        (`ppo.reward_model_weight` 0)."""
        if self.reward_model is None:
            return None
        logits = self.reward_model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, 0].float() if logits.shape[1] == 1 else logits.float()

    def _episodes(
        self, rows: Sequence[dict], params: SamplingParams, seed: int
    ) -> tuple[Samples, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, dict[str, float]]:
        """One episode per row in the environment: as `Samples` (the first observation as the prompt, the policy's
        tokens as the completion, the last policy turn as the text, `ended` for an episode the environment ended),
        the trajectories' (input_ids, attention_mask, policy mask), each episode's reward, the `env/*` metrics."""
        spec = self.episodes
        episodes = run_episodes(
            self.policy,
            self.tokenizer,
            spec.make_env,
            rows,
            spec.budgets,
            params,
            seed=seed,
            batch_size=len(rows),
            tool_stops=spec.tool_stops,
            timeout_s=spec.timeout_s,
            kind=spec.kind,
        )
        batch = {k: v.to(self.device) for k, v in episode_batch(episodes, self.tokenizer.pad_token_id).items()}
        samples = Samples(
            [e.prompt_ids for e in episodes],
            [[t for t, own in zip(e.ids, e.policy, strict=True) if own] for e in episodes],
            [next(text for role, text in reversed(e.transcript) if role == "policy") for e in episodes],
            [e.done for e in episodes],
            [False] * len(episodes),
        )
        rewards = torch.tensor([e.reward for e in episodes], device=self.device)
        sequences = (batch["input_ids"], batch["attention_mask"], batch["mask"])
        return samples, sequences, rewards, episode_stats(episodes)

    @torch.no_grad()
    def make_rollout(self, prompts: Sequence, step: int) -> tuple[Rollout, dict[str, float], Samples]:
        """One rollout batch from `prompts`: token ids (single-turn), or data rows (episodes in an environment)."""
        cfg = self.cfg
        params = SamplingParams(
            cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, self.compiled_sampling, key="ppo.max_new_tokens"
        )
        seed = self.seed + 7919 * step + self.global_rank
        group = cfg.num_generations
        prompts = [prompt for prompt in prompts for _ in range(group)]  # each prompt's samples are consecutive rows
        env_rewards, env_stats = None, {}
        if self.episodes is None:
            samples = sample_ids(self.policy, self.tokenizer, prompts, params, batch_size=len(prompts), seed=seed)
            input_ids, attention_mask, mask = self._sequences(samples)
        else:
            samples, sequences, env_rewards, env_stats = self._episodes(prompts, params, seed)
            input_ids, attention_mask, mask = sequences
        logps, _ = self._logps(self.policy, input_ids, attention_mask)
        with as_reference(self.policy, self.reference) as reference:
            ref_logps, _ = self._logps(reference, input_ids, attention_mask)
        values = None
        if self.value_model is not None:
            values = token_values(self.value_model, input_ids, attention_mask)[:, :-1]
        prompts = self.tokenizer.batch_decode(samples.prompt_ids)
        golds = self.judge.score(prompts, samples.texts)
        ended = torch.tensor(samples.ended, device=self.device)
        raw_scores = self._reward_scores(input_ids, attention_mask)
        kl = kl_estimate(logps, ref_logps, cfg.kl_estimator) * mask  # (B, T-1)
        shaped = shape_rewards(
            kl,
            mask,
            ended,
            reward_model_scores=raw_scores,
            judge_scores=torch.tensor(golds, device=self.device),
            weights=self.reward_weights,
            kl_coef=self.kl_ctl.value if cfg.kl_in == "reward" else None,
            env_rewards=env_rewards,
            whiten=cfg.whiten_rewards,
        )
        rewards, scores, non_score = shaped.rewards, shaped.scores, shaped.non_score
        advantages, returns = estimate_advantages(
            cfg.advantage_estimator, rewards, mask, values=values, group_size=group, gamma=cfg.gamma, lam=cfg.lam
        )
        if not (torch.isfinite(advantages).all() and (returns is None or torch.isfinite(returns).all())):
            shown = raw_scores if raw_scores is not None else scores
            raise PPOHealthError(
                f"ppo: non-finite advantages at rollout {step} (scores {shown.tolist()[:4]}...); check the "
                "reward model's saved mean/std (models/reward/reward_stats.json), ppo.reward_clip and ppo.lr"
            )
        stats = {
            "objective/kl": float(kl.sum(1).mean()),
            "objective/entropy": float((-logps * mask).sum(1).mean()),
            "objective/scores": float(scores.mean()),
            "objective/non_score_reward": float(non_score.sum(1).mean()),
            "objective/rlhf_reward": float((scores + non_score.sum(1)).mean()),
            "objective/kl_coef": float(self.kl_ctl.value if cfg.kl_in == "reward" else cfg.kl_loss_coef),
            "objective/gold_scores": sum(golds) / len(golds),
            **({"objective/ensemble_std": float(shaped.spread.mean())} if shaped.spread is not None else {}),
            "val/num_eos_tokens": float(ended.sum()),
            "val/eos_rate": float(ended.float().mean()),
            "val/stopped_by_context": float(sum(samples.stopped_by_context)),
            "val/response_length": float(mask.sum(1).mean()),
            **env_stats,
        }
        if isinstance(self.judge, VerifierJudge):  # the share of rollout responses whose answer checks; hung checks
            correct = self.judge.last_correct
            stats["objective/accuracy"] = sum(correct) / len(correct)
            stats["objective/verifier_timeouts"] = float(self.judge.timeouts)
        if cfg.advantage_estimator in GROUP_ESTIMATORS:  # the spread the group baseline works with, as TRL logs it
            spread = (scores + non_score.sum(1)).view(-1, group).std(1)
            stats["objective/reward_std"] = float(spread.mean())
            stats["objective/frac_reward_zero_std"] = float((spread < 1e-6).float().mean())
        self.last_samples = [
            {"prompt": p, "response": t, "score": float(s), "gold": g, "ended": e}
            for p, t, s, g, e in zip(prompts, samples.texts, scores, golds, samples.ended, strict=True)
        ]
        rollout = Rollout(input_ids, attention_mask, mask, logps, ref_logps, advantages, values, returns)
        return rollout, stats, samples

    @torch.no_grad()
    def measure(self, step: int) -> dict[str, float]:
        """The monitor's measurement of the current policy on its fixed prompts and seed (`monitor_metrics`), the
        global RNG left as it was: training draws the same with the monitor on or off."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self._measure(step)

    def _measure(self, step: int) -> dict[str, float]:
        cfg, spec = self.cfg, self.watch.spec
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, self.compiled_sampling)
        samples = sample_ids(
            self.policy, self.tokenizer, spec.prompt_ids, params, batch_size=len(spec.prompt_ids), seed=spec.seed
        )
        input_ids, attention_mask, mask = self._sequences(samples)
        logps, _ = self._logps(self.policy, input_ids, attention_mask)
        with as_reference(self.policy, self.reference) as reference:
            ref_logps, _ = self._logps(reference, input_ids, attention_mask)
        golds = self.judge.score(self.tokenizer.batch_decode(samples.prompt_ids), samples.texts)
        raw_scores = self._reward_scores(input_ids, attention_mask)
        shaped = shape_rewards(  # the RL reward's score, without its KL term
            torch.zeros_like(mask),
            mask,
            torch.tensor(samples.ended, device=self.device),
            reward_model_scores=raw_scores,
            judge_scores=torch.tensor(golds, device=self.device),
            weights=self.reward_weights,
            kl_coef=None,
        )
        kl = (kl_estimate(logps, ref_logps, "k1") * mask).sum(1)
        baseline = self.watch.history[0] if self.watch.history else None
        metrics = monitor_metrics(shaped.scores.tolist(), golds, kl.tolist(), mask.sum(1).tolist(), baseline)
        if shaped.spread is not None:  # a reward ensemble's disagreement: where the proxy is unsure
            metrics["monitor/ensemble_std"] = float(shaped.spread.mean())
        return {"step": float(step), **metrics}

    def _watch(self, step: int) -> bool:
        """Measure, log, and act on the gates the measurement trips: whether training stops here."""
        point = self.measure(step)
        new = self.watch.record(point, self.policy.state_dict())
        if self.logger is not None:
            trips = {f"gates/{trip.gate}": trip.value for trip in new}
            self.logger.log_metrics({**{k: v for k, v in point.items() if k != "step"}, **trips}, step=step)
        stop = self.watch.act(new)
        if stop:
            self.trainer.should_stop = True
        return stop

    def _update(self, rollout: Rollout, step: int) -> dict[str, float]:
        cfg = self.cfg
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]  # policy, then the value model's
        generator = torch.Generator().manual_seed(self.seed + step)
        totals: dict[str, list[torch.Tensor]] = {}
        for _ in range(cfg.ppo_epochs):
            for index in torch.randperm(len(rollout.input_ids), generator=generator).split(cfg.minibatch_size):
                index = index.to(self.device)
                for optimizer in optimizers:
                    optimizer.zero_grad()
                # Gradient accumulation: micro-batches weighted by their share of what the loss averages over (the
                # minibatch's response tokens, or its rows), so k of them give the gradient of the whole minibatch.
                total = self._loss_size(rollout.mask, index)
                for micro in index.chunk(self.accumulate):
                    stats = self._backward(rollout, micro, weight=self._loss_size(rollout.mask, micro) / total)
                    for key, value in stats.items():
                        totals.setdefault(key, []).append(value)
                for optimizer in optimizers:
                    if cfg.grad_clip:
                        self.clip_gradients(optimizer, gradient_clip_val=cfg.grad_clip, gradient_clip_algorithm="norm")
                    optimizer.step()
        for scheduler in self._schedulers():
            scheduler.step()
        stacked = {key: torch.stack(values) for key, values in totals.items()}  # one host sync below, per rollout
        self._check_update(stacked, step)
        return {key: float(values.mean()) for key, values in stacked.items()}

    def _schedulers(self) -> list:
        """Lightning hands back a lone scheduler bare (critic-free: the policy's only)."""
        schedulers = self.lr_schedulers()
        return schedulers if isinstance(schedulers, list) else [schedulers]

    def _loss_size(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | int:
        """What the loss of `rows` averages over: their response tokens (token mean) or the rows themselves."""
        return mask[rows].sum() if self.aggregation == "token_mean" else len(rows)

    def _backward(
        self, rollout: Rollout, index: torch.Tensor, *, weight: torch.Tensor | float
    ) -> dict[str, torch.Tensor]:
        """Policy (+ KL, + value) losses of the rows `index`, backpropagated times `weight`; their detached stats."""
        cfg = self.cfg
        ids, am, mask = rollout.input_ids[index], rollout.attention_mask[index], rollout.mask[index]
        logps, entropy = self._logps(self.policy, ids, am, with_entropy=True)
        aggregation = {"aggregation": self.aggregation, "max_tokens": self.max_tokens}
        pg_loss, pg_stats = clipped_policy_loss(
            logps, rollout.logps[index], rollout.advantages[index], mask, cliprange=cfg.cliprange, **aggregation
        )
        loss = pg_loss
        stats = {
            "loss/policy_avg": pg_loss.detach(),
            "policy/approxkl_avg": pg_stats["approxkl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "policy/entropy_avg": masked_mean(entropy, mask),
            "val/ratio": pg_stats["ratio"],
        }
        if cfg.kl_in == "loss":  # k3 of the current policy against the reference, per token (GRPO)
            kl_loss = aggregate_loss(
                kl_estimate(logps, rollout.ref_logps[index], "k3"),
                mask,
                self.aggregation,
                max_tokens=self.max_tokens,
            )
            loss = loss + cfg.kl_loss_coef * kl_loss
            stats["loss/kl_avg"] = kl_loss.detach()
        if self.value_model is not None:
            values = token_values(self.value_model, ids, am)[:, :-1]
            vf_loss, vf_clipfrac = clipped_value_loss(
                values, rollout.values[index], rollout.returns[index], mask, cliprange=cfg.cliprange_value
            )
            loss = loss + cfg.vf_coef * vf_loss
            stats.update({"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac})
        self.manual_backward(loss if self.accumulate == 1 else loss * weight)
        return stats

    def _check_update(self, stacked: dict[str, torch.Tensor], step: int) -> None:
        for key in ("loss/policy_avg", "loss/value_avg", "loss/kl_avg"):
            if key in stacked and not torch.isfinite(stacked[key]).all():
                raise PPOHealthError(
                    f"ppo: non-finite {key} at rollout {step}; lower ppo.lr / ppo.value_lr or set ppo.grad_clip"
                )
        worst = float(stacked["val/ratio"].max())
        if worst > self.cfg.max_ratio:
            raise PPOHealthError(
                f"ppo: mean importance ratio {worst:.3g} exceeds ppo.max_ratio = {self.cfg.max_ratio} at rollout "
                f"{step}: the policy moved too far from the rollout policy; lower ppo.lr or ppo.ppo_epochs"
            )

    def on_fit_start(self) -> None:
        self.judge.to(self.device)

    def training_step(self, prompts: list, batch_idx: int) -> None:
        if self.watch is not None and batch_idx % self.watch.spec.every == 0 and self._watch(batch_idx):
            return  # a gate stopped training before this rollout
        start = time.perf_counter()
        rollout, stats, samples = self.make_rollout(prompts, batch_idx)
        if stats["val/eos_rate"] < self.cfg.min_eos_rate:
            raise PPOHealthError(
                f"ppo: only {stats['val/eos_rate']:.0%} of rollout {batch_idx}'s responses ended with EOS, under "
                f"ppo.min_eos_rate = {self.cfg.min_eos_rate}; raise ppo.missing_eos_penalty or ppo.max_new_tokens, "
                "or lower ppo.lr"
            )
        stats["time/rollout_s"] = time.perf_counter() - start
        stats.update(self._update(rollout, batch_idx))
        stats["time/update_s"] = time.perf_counter() - start - stats["time/rollout_s"]
        kl = stats["objective/kl"]
        if self.trainer.world_size > 1:  # one coefficient for the run: every rank updates it from the mean over ranks
            kl = float(self.trainer.strategy.reduce(torch.tensor(kl, device=self.device), reduce_op="mean"))
        self.kl_ctl.update(kl, n_steps=len(samples.texts))
        generated = sum(len(c) for c in samples.completion_ids)
        trained = int(rollout.attention_mask.sum()) * self.cfg.ppo_epochs
        stats["perf/generated_tokens"], stats["perf/trained_tokens"] = float(generated), float(trained)
        stats["perf/tokens_per_s"] = (generated + trained) / (time.perf_counter() - start)
        stats["lr"] = self._schedulers()[0].get_last_lr()[0]
        self.history.append({"step": float(batch_idx), **stats})
        if self.logger is not None:
            self.logger.log_metrics(stats, step=batch_idx)

    def on_train_end(self) -> None:
        """The monitor's last measurement, after the last update (unless a gate stopped training)."""
        if self.watch is not None and self.watch.stopped_at is None and self.history:
            self._watch(len(self.history))

    def restore_best(self) -> None:
        """After a gate stopped training: the policy of the best monitored gold score, as the stage's model."""
        if self.watch is not None and self.watch.stopped_at is not None:
            self.policy.load_state_dict(self.watch.best_state)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ppo"] = {"kl_coef": float(self.kl_ctl.value), "history": self.history}
        if self.watch is not None:
            checkpoint["ppo"]["monitor"] = self.watch.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_ctl.value = checkpoint["ppo"]["kl_coef"]
        self.history = checkpoint["ppo"]["history"]
        if self.watch is not None:
            self.watch.load_state_dict(checkpoint["ppo"]["monitor"])

    def configure_optimizers(self):
        args = {
            "weight_decay": 0.0,
            "warmup_steps": self.cfg.warmup_rollouts,
            "max_steps": self.cfg.rollouts,
            "precision": str(self.trainer.precision),
        }
        optimizers = [build_optimizer(self.policy, lr=self.cfg.lr, **args)]
        if self.value_model is not None:
            optimizers.append(build_optimizer(self.value_model, lr=self.cfg.value_lr, **args))
        return optimizers


def fit_ppo(
    policy,
    value_model,
    reference,
    reward_model,
    judge,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    cfg: PPOConfig,
    trainer: TrainerConfig,
    *,
    reward_mean: float,
    reward_std: float,
    seed: int,
    reward_heads: Sequence[tuple[float, float]] = (),
    compiled_sampling: bool = False,
    hooks: Hooks = NO_HOOKS,
    episodes: EpisodeSpec | None = None,
    rows: Sequence[dict] = (),
    monitor: MonitorSpec | None = None,
) -> tuple[PPOModule, bool]:
    """Online RL of `policy` (`cfg.advantage_estimator`: PPO with `value_model`, or a critic-free estimator with
    None) for `cfg.rollouts` rollout batches. `reference` None: the LoRA policy with its adapters off. With
    `episodes`, rollouts are episodes in its environment, one per data row of `rows` drawn (`prompt_ids` unused).
    With `monitor`, the proxy-versus-gold monitor measures every `monitor.every` rollouts and its gates act.

    Returns:
        (the module, whose `history` holds every rollout's metrics; whether this process is rank 0).
    """
    module = PPOModule(
        policy=policy,
        value_model=value_model,
        reference=reference,
        reward_model=reward_model,
        judge=judge,
        tokenizer=tokenizer,
        cfg=cfg,
        reward_mean=reward_mean,
        reward_std=reward_std,
        seed=seed,
        reward_heads=reward_heads,
        accumulate=trainer.accumulate_grad_batches,
        compiled_sampling=compiled_sampling,
        episodes=episodes,
        monitor=monitor,
    )
    prompts = list(rows) if episodes is not None else prompt_ids
    batches = PromptBatches(len(prompts), cfg.prompts_per_rollout, cfg.rollouts, seed + hooks.rank)
    loader = DataLoader(prompts, batch_sampler=batches, collate_fn=list)
    callback = checkpointing(hooks, batches, unit="rollouts")
    fitter = build_trainer(
        trainer,
        max_steps=-1,
        max_epochs=1,
        val_every_n_steps=None,
        grad_clip=0.0,
        logger=hooks.logger,
        callbacks=[*([callback] if callback else []), *hooks.callbacks],
    )
    fitter.fit(module, train_dataloaders=loader, ckpt_path=hooks.resume_from, weights_only=True)
    module.restore_best()
    return module, fitter.is_global_zero
