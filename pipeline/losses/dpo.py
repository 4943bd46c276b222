"""DPO-family losses as pure functions, chosen by name from `DPO_LOSSES` or `REFERENCE_FREE_LOSSES`.

Every `DPO_LOSSES` variant takes the policy's and the reference's summed log-probs of the chosen and rejected
responses and returns per-pair losses plus the implicit rewards beta * (log pi - log ref), detached (they are
diagnostics). `logits` below is the policy's log-ratio margin minus the reference's:
(log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)).

The reference-free losses (SimPO, ORPO) need no reference model and no cached reference log-probs: they work on
the policy's length-normalised log-probs, log pi(y) / |y| (`reference_free_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, float, float], torch.Tensor]


def _sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # DPO, Rafailov et al. 2023 eq. 7; with label_smoothing > 0 the conservative cDPO (Mitchell 2023).
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _robust(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # Robust DPO, Chowdhury et al. 2024 eq. 8: unbiased under label-flip rate `label_smoothing` (< 0.5).
    flipped = -F.logsigmoid(beta * logits) * (1 - label_smoothing) + F.logsigmoid(-beta * logits) * label_smoothing
    return flipped / (1 - 2 * label_smoothing)


def _hinge(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # SLiC-HF, Zhao et al. 2023: a hinge on the scaled margin.
    return torch.relu(1 - beta * logits)


def _ipo(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # IPO, Azar et al. 2023 eq. 17: regress the margin to 1 / (2 beta) (beta plays tau's role).
    return (logits - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, LossFn] = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family loss and detached implicit rewards.

    Args:
        policy_chosen_logps: Shape: (B,).
        policy_rejected_logps: Shape: (B,).
        reference_chosen_logps: Shape: (B,).
        reference_rejected_logps: Shape: (B,).
        beta: strength of the KL constraint (temperature of the implicit reward).
        loss_type: a key of `DPO_LOSSES`.
        label_smoothing: assumed label-flip rate for `sigmoid` (cDPO) and `robust`.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each of shape (B,).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo.loss: unknown loss {loss_type!r}; valid: {', '.join(sorted(DPO_LOSSES))}")
    policy_logratios = policy_chosen_logps - policy_rejected_logps
    reference_logratios = reference_chosen_logps - reference_rejected_logps
    losses = DPO_LOSSES[loss_type](policy_logratios - reference_logratios, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def _simpo(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, simpo_gamma: float, orpo_lambda: float):
    # SimPO, Meng et al. 2024 eq. 6: -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma).
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    return -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma), chosen_rewards, rejected_rewards


def _orpo(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, simpo_gamma: float, orpo_lambda: float):
    # ORPO, Hong et al. 2024 eq. 6-7: the chosen response's NLL plus lambda * -log sigmoid(log odds ratio), with
    # odds(y) = P(y) / (1 - P(y)) and P(y) = exp(mean token log-prob). log(1 - e^x) as log(-expm1(x)), stable near 0.
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    losses = -chosen - orpo_lambda * F.logsigmoid(log_odds)
    return losses, orpo_lambda * chosen, orpo_lambda * rejected


REFERENCE_FREE_LOSSES = {"simpo": _simpo, "orpo": _orpo}


def reference_free_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO or ORPO loss and detached rewards, from summed log-probs and response lengths.

    Args:
        policy_chosen_logps: summed log-probs of the chosen responses. Shape: (B,).
        policy_rejected_logps: Shape: (B,).
        chosen_lengths: scored tokens of each chosen response (its EOS included). Shape: (B,).
        rejected_lengths: Shape: (B,).
        loss_type: a key of `REFERENCE_FREE_LOSSES`.
        beta: SimPO's reward scale (the paper uses 2 to 2.5).
        simpo_gamma: SimPO's target reward margin.
        orpo_lambda: ORPO's weight of the odds-ratio term.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each of shape (B,).
    """
    if loss_type not in REFERENCE_FREE_LOSSES:
        raise ValueError(f"dpo.loss: {loss_type!r} is not reference-free; valid: {', '.join(REFERENCE_FREE_LOSSES)}")
    chosen, rejected = policy_chosen_logps / chosen_lengths, policy_rejected_logps / rejected_lengths
    losses, chosen_rewards, rejected_rewards = REFERENCE_FREE_LOSSES[loss_type](
        chosen, rejected, beta=beta, simpo_gamma=simpo_gamma, orpo_lambda=orpo_lambda
    )
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
