"""Reward shaping for online RL as one pure function: what a rollout's responses earn, token by token.

A response's score is the reward model's, normalised with its saved mean and std, clipped and weighted, plus the
judge's weighted, minus a penalty when the response did not end with EOS; it sits at the response's last token. The
KL penalty to the reference, -kl_coef x the per-token KL estimate, sits on every response token (Ziegler et al. 2019;
the "N+ implementation details of RLHF with PPO", Huang et al. 2024), unless the KL goes into the loss instead.
Tensors are token-aligned as in `pipeline.losses.rl`: position t scores the token at t + 1.
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
    judge_weight: float = 0.0
    missing_eos_penalty: float = 0.0


@dataclass(frozen=True)
class ShapedRewards:
    rewards: torch.Tensor
    """Per-token rewards. Shape: (B, T - 1)."""
    scores: torch.Tensor
    """Each response's score (at its last token). Shape: (B,)."""
    non_score: torch.Tensor
    """The KL penalty part of `rewards`. Shape: (B, T - 1)."""


def shape_rewards(
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    last: torch.Tensor,
    ended: torch.Tensor,
    *,
    reward_model_scores: torch.Tensor | None,
    judge_scores: torch.Tensor,
    weights: RewardWeights,
    kl_coef: float | None,
    whiten: bool = False,
) -> ShapedRewards:
    """Per-token rewards of a rollout.

    Args:
        token_kl: the per-token KL estimate to the reference, zero off the response. Shape: (B, T - 1).
        mask: 1 on response tokens. Shape: (B, T - 1).
        last: the token-aligned index of each response's last token. Shape: (B,).
        ended: whether each response ended with EOS. Shape: (B,), bool.
        reward_model_scores: the reward model's raw scores, or None when no reward model is run (its weight is 0).
            Shape: (B,).
        judge_scores: the judge's scores. Shape: (B,).
        weights: normalisation, clipping and weights of the parts.
        kl_coef: the KL penalty's coefficient, or None when the KL is a loss term (`ppo.kl_in: loss`).
        whiten: scale the rewards to unit variance over the response tokens (their mean kept).
    """
    scores = torch.zeros(len(judge_scores), device=token_kl.device)
    if reward_model_scores is not None:
        scores = (reward_model_scores - weights.reward_mean) / weights.reward_std
        if weights.reward_clip:
            scores = scores.clamp(-weights.reward_clip, weights.reward_clip)
        if weights.reward_model_weight != 1:
            scores = weights.reward_model_weight * scores
    if weights.judge_weight:
        scores = scores + weights.judge_weight * judge_scores.to(scores)
    scores = scores - weights.missing_eos_penalty * (~ended).float()
    non_score = -kl_coef * token_kl if kl_coef is not None else torch.zeros_like(token_kl)
    rewards = non_score.clone()
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    if whiten:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    return ShapedRewards(rewards, scores, non_score)
