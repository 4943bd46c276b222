"""RL math for the `ppo` stage as pure functions: KL estimators, masked whitening, the advantage estimators (GAE
and the critic-free GRPO, Dr. GRPO, RLOO and REINFORCE++), loss aggregation, clipped losses, the KL controller.

Tensors are token-aligned: position t scores the token at t + 1 (as `logprobs.token_logps` returns), and `mask`
marks response tokens. Group estimators see a rollout as consecutive groups of `group_size` samples of one prompt.
References: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ziegler et al. 2019 (adaptive KL), Schulman 2020
"Approximating KL divergence" (k1, k2, k3), Huang et al. 2024 "The N+ implementation details of RLHF with PPO",
Shao et al. 2024 (GRPO), Liu et al. 2025 "Understanding R1-Zero-like training" (Dr. GRPO), Ahmadian et al. 2024
(RLOO), Hu 2025 (REINFORCE++).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _k1(logr: torch.Tensor) -> torch.Tensor:
    return logr


def _k2(logr: torch.Tensor) -> torch.Tensor:
    return 0.5 * logr**2


def _k3(logr: torch.Tensor) -> torch.Tensor:
    # (r - 1) - log r with r = ref / pi = exp(-logr): unbiased and never negative.
    return torch.expm1(-logr) + logr


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi.

    Args:
        logps: log pi of the sampled tokens. Shape: (B, T).
        ref_logps: log ref of the same tokens. Shape: (B, T).
        estimator: `k1` (log-ratio, unbiased, can be negative), `k2` (half squared log-ratio, low variance,
            biased), `k3` (unbiased and non-negative).

    Returns:
        Shape: (B, T).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"ppo.kl_estimator: unknown {estimator!r}; valid: {', '.join(sorted(KL_ESTIMATORS))}")
    return KL_ESTIMATORS[estimator](logps - ref_logps)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all entries, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Standardise the masked entries (unbiased variance); `shift_mean=False` keeps their mean.

    Args:
        values: Shape: (B, T).
        mask: Shape: (B, T).
    """
    mean = masked_mean(values, mask)
    centered = values - mean
    n = mask.sum().clamp(min=2)
    variance = (centered**2 * mask).sum() / (n - 1)
    whitened = centered * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (policy) positions.

    The recursion runs over the policy's tokens alone: a span the mask leaves out inside a trajectory (an
    environment's observation) is stepped over, the value of the next policy token after it bootstraps the one
    before it, and its rewards count for nothing. After the last policy token the value is 0 (episode end).

    Args:
        rewards: Shape: (B, T).
        values: Shape: (B, T).
        mask: Shape: (B, T).

    Returns:
        (advantages, returns), each (B, T), zero outside the mask.
    """
    mask = mask.to(values.dtype)
    policy = mask > 0
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(last)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * last
        advantages[:, t] = step
        last = torch.where(policy[:, t], step, last)
        next_value = torch.where(policy[:, t], values[:, t], next_value)
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo"})
"""Estimators whose baseline is the other samples of the same prompt: they need `group_size` >= 2."""
CRITIC_FREE = frozenset(ADVANTAGE_ESTIMATORS) - {"gae"}
"""Estimators that need no value model."""

# How each estimator turns per-token losses into one number: the mean over all response tokens of the minibatch
# (PPO as the N+ details paper and OpenRLHF do it), the mean over sequences of each sequence's token mean (the GRPO
# paper), or the token sum over a constant (Dr. GRPO: rows x max_new_tokens, so long answers get no smaller weight).
LOSS_AGGREGATION = {
    "gae": "token_mean",
    "grpo": "sequence_mean",
    "dr_grpo": "token_sum",
    "rloo": "token_mean",
    "reinforce_pp": "token_mean",
}


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, how: str, *, max_tokens: int) -> torch.Tensor:
    """One loss from per-token losses (B, T): `token_mean`, `sequence_mean` or `token_sum` (see LOSS_AGGREGATION);
    `max_tokens` is the constant per-row denominator of `token_sum`."""
    if how == "token_mean":
        return masked_mean(per_token, mask)
    if how == "sequence_mean":
        return masked_mean(per_token, mask, dim=1).mean()
    if how == "token_sum":
        return (per_token * mask.to(per_token.dtype)).sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}; valid: token_mean, sequence_mean, token_sum")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage: each sequence reward minus its group's mean, divided by the group's (unbiased) std
    plus `eps` when `scale` (GRPO), left unscaled otherwise (Dr. GRPO).

    Args:
        rewards: one reward per sequence, groups of `group_size` consecutive rows. Shape: (B,).

    Returns:
        Shape: (B,).
    """
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(1, keepdim=True) + eps)
    return centered.flatten()


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each sequence reward minus the mean of the other `group_size - 1` rewards of its group. Shape: (B,)."""
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).flatten()


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t'} over the masked positions, t' the next masked one: a span the mask
    leaves out inside a trajectory (an environment's observation) neither cuts the return nor adds to it. Zero
    outside the mask. Shape: (B, T)."""
    mask = mask.to(rewards.dtype)
    policy = mask > 0
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        step = rewards[:, t] + gamma * running
        returns[:, t] = step * mask[:, t]
        running = torch.where(policy[:, t], step, running)
    return returns


def estimate_advantages(
    estimator: str,
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (and GAE's value targets) of one rollout.

    Args:
        estimator: one of ADVANTAGE_ESTIMATORS.
            `gae`: GAE over the critic's `values`, whitened over the batch;
            `grpo` / `dr_grpo`: the group-normalised / group-centred sequence reward on every response token;
            `rloo`: the leave-one-out sequence advantage on every response token;
            `reinforce_pp`: the discounted reward-to-go, whitened over the batch (REINFORCE++).
        token_rewards: per-token rewards: the score at each response's last token plus any per-token KL penalty.
            The sequence estimators use each row's sum. Shape: (B, T).
        mask: response tokens. Shape: (B, T).
        values: the critic's per-token values; `gae` only. Shape: (B, T).

    Returns:
        (advantages, returns): returns are GAE's value targets, None for the critic-free estimators.
    """
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage estimator 'gae' needs the value model's values")
        advantages, returns = gae_advantages(token_rewards, values, mask, gamma=gamma, lam=lam)
        return masked_whiten(advantages, mask), returns
    if estimator == "reinforce_pp":
        return masked_whiten(discounted_returns(token_rewards, mask, gamma=gamma), mask), None
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"ppo.advantage_estimator: unknown {estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
    if group_size < 2 or len(token_rewards) % group_size:
        raise ValueError(
            f"ppo.advantage_estimator {estimator!r} needs groups of >= 2 samples per prompt; got "
            f"{len(token_rewards)} rows in groups of {group_size} (set ppo.num_generations)"
        )
    sequence_rewards = (token_rewards * mask.to(token_rewards.dtype)).sum(1)
    if estimator == "rloo":
        advantages = rloo_advantages(sequence_rewards, group_size)
    else:
        advantages = group_advantages(sequence_rewards, group_size, scale=estimator == "grpo")
    return advantages[:, None] * mask.to(advantages.dtype), None


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    aggregation: str = "token_mean",
    max_tokens: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017 eq. 7), as a loss to minimise.

    Args:
        logps, old_logps, advantages, mask: Shape: (B, T).
        aggregation, max_tokens: how per-token losses become one (`aggregate_loss`).

    Returns:
        (loss, detached stats: clipfrac, approxkl, ratio mean).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens=max_tokens)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2); returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange, cliprange)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
