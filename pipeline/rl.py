"""RL math for PPO as pure functions: KL estimators, masked whitening, GAE, clipped losses, the KL controller.

Tensors are token-aligned: position t scores the token at t + 1 (as `logprobs.token_logps` returns), and `mask`
marks response tokens. References: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ziegler et al. 2019
(adaptive KL), Schulman 2020 "Approximating KL divergence" (k1, k2, k3), Huang et al. 2024 "The N+
implementation details of RLHF with PPO".
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
    """Generalised advantage estimation over the masked (response) positions.

    A response ends where the mask drops to 0: the value after its last token is 0 (episode end).

    Args:
        rewards: Shape: (B, T).
        values: Shape: (B, T).
        mask: Shape: (B, T).

    Returns:
        (advantages, returns), each (B, T), zero outside the mask.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_mask = mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017 eq. 7), as a loss to minimise.

    Args:
        logps, old_logps, advantages, mask: Shape: (B, T).

    Returns:
        (loss, detached stats: clipfrac, approxkl, ratio mean).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
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
