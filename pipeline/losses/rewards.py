"""Reward shaping for online RL as one pure function: what a rollout's responses earn, token by token.

A response's score is the reward model's, normalised with its saved mean and std, clipped and weighted (a reward
ensemble's heads each normalised and clipped, then combined: `combine_heads`), plus the judge's weighted, plus an
environment's reward weighted (multi-turn episodes), minus a penalty when the response did not end with EOS; it sits
at the last policy token of the trajectory. The KL penalty to the reference, -kl_coef x the per-token KL estimate,
sits on every policy token (Ziegler et al. 2019; the "N+ implementation details of RLHF with PPO", Huang et al.
2024), unless the KL goes into the loss instead. Neither ever sits on a token the mask leaves out (an environment's
observation inside a trajectory). Tensors are token-aligned as in `pipeline.losses.rl`: position t scores the token
at t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.losses.rl import masked_whiten


@dataclass(frozen=True)
class RewardWeights:
    """How the parts of a score add up (the `ppo.*` keys of the same names, and the reward model's saved stats)."""

    reward_mean: float = 0.0
    reward_std: float = 1.0
    reward_clip: float = 0.0
    """0: no clipping of the normalised reward-model score."""
    reward_model_weight: float = 1.0
    head_means: tuple[float, ...] = ()
    head_stds: tuple[float, ...] = ()
    """A reward ensemble's per-head normalisation (its first head's being `reward_mean`, `reward_std`)."""
    combine: str = "mean"
    """How an ensemble's normalised heads make one score: `mean`, `mean_minus_std`, `min`."""
    std_coef: float = 1.0
    """`mean_minus_std`: spreads below the mean."""
    judge_weight: float = 0.0
    env_weight: float = 1.0
    """The weight of an environment's episode reward (`env.reward_weight`), where there is one."""
    missing_eos_penalty: float = 0.0


@dataclass(frozen=True)
class ShapedRewards:
    rewards: torch.Tensor
    """Per-token rewards. Shape: (B, T - 1)."""
    scores: torch.Tensor
    """Each response's score (at its last token). Shape: (B,)."""
    non_score: torch.Tensor
    """The KL penalty part of `rewards`. Shape: (B, T - 1)."""
    spread: torch.Tensor | None = None
    """A reward ensemble's disagreement per response: the standard deviation of its normalised heads. Shape: (B,)."""


def shape_rewards(
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    ended: torch.Tensor,
    *,
    reward_model_scores: torch.Tensor | None,
    judge_scores: torch.Tensor,
    weights: RewardWeights,
    kl_coef: float | None,
    env_rewards: torch.Tensor | None = None,
    whiten: bool = False,
) -> ShapedRewards:
    """Per-token rewards of a rollout.

    Args:
        token_kl: the per-token KL estimate to the reference. Shape: (B, T - 1).
        mask: 1 on the policy's tokens (a single-turn response, or every policy turn of an episode). Shape: (B, T - 1).
        ended: whether each response ended with EOS. Shape: (B,), bool.
        reward_model_scores: the reward model's raw scores, or None when no reward model is run (its weight is 0).
            Shape: (B,), or (B, heads) for an ensemble, whose normalised, clipped heads `weights.combine` makes one.
        judge_scores: the judge's scores. Shape: (B,).
        weights: normalisation, clipping and weights of the parts.
        kl_coef: the KL penalty's coefficient, or None when the KL is a loss term (`ppo.kl_in: loss`).
        env_rewards: each episode's reward from its environment, or None (single-turn). Shape: (B,).
        whiten: scale the rewards to unit variance over the response tokens (their mean kept).
    """
    scores, spread = response_scores(
        reward_model_scores, judge_scores, ended, weights, env_rewards=env_rewards, device=token_kl.device
    )
    non_score = -kl_coef * (token_kl * mask) if kl_coef is not None else torch.zeros_like(token_kl)
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=rewards.device), last_policy_token(mask)] += scores
    if whiten:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    return ShapedRewards(rewards, scores, non_score, spread)


def response_scores(
    reward_model_scores: torch.Tensor | None,
    judge_scores: torch.Tensor,
    ended: torch.Tensor,
    weights: RewardWeights,
    *,
    env_rewards: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each response's score, as `shape_rewards` composes it (its arguments of the same names), and a reward
    ensemble's disagreement per response (None without one). Online DPO's rounds rank their samples with it.

    Returns:
        (scores, spread). Shapes: (B,), (B,).
    """
    scores = torch.zeros(len(judge_scores), device=device)
    spread = None
    if reward_model_scores is not None and reward_model_scores.ndim == 2:
        means, stds = (torch.tensor(v, device=scores.device) for v in (weights.head_means, weights.head_stds))
        heads = (reward_model_scores - means) / stds
        if weights.reward_clip:
            heads = heads.clamp(-weights.reward_clip, weights.reward_clip)
        scores, spread = combine_heads(heads, weights.combine, weights.std_coef), heads.std(1)
    elif reward_model_scores is not None:
        scores = (reward_model_scores - weights.reward_mean) / weights.reward_std
        if weights.reward_clip:
            scores = scores.clamp(-weights.reward_clip, weights.reward_clip)
    if reward_model_scores is not None and weights.reward_model_weight != 1:
        scores = weights.reward_model_weight * scores
    if weights.judge_weight:
        scores = scores + weights.judge_weight * judge_scores.to(scores)
    if env_rewards is not None and weights.env_weight:
        scores = scores + weights.env_weight * env_rewards.to(scores)
    scores = scores - weights.missing_eos_penalty * (~ended).float()
    return scores, spread


def combine_heads(heads: torch.Tensor, combine: str, std_coef: float) -> torch.Tensor:
    """One score per response from an ensemble's normalised heads (B, heads): their mean, their mean minus
    `std_coef` standard deviations (the sample std across heads), or their minimum (Coste et al. 2023)."""
    if combine == "mean":
        return heads.mean(1)
    if combine == "mean_minus_std":
        return heads.mean(1) - std_coef * heads.std(1)
    if combine == "min":
        return heads.amin(1)
    raise ValueError(f"ppo.ensemble_combine: {combine!r} is not one of mean, mean_minus_std, min")


def last_policy_token(mask: torch.Tensor) -> torch.Tensor:
    """The token-aligned index of each row's last masked position (0 for a row with none). Shape: (B,)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, 0).amax(1)
