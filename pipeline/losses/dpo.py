"""The DPO family as one table of pure functions, `DPO_LOSSES`, keyed by `dpo.loss`.

Each entry says whether its loss reads the reference's log-probs (the `reference` stage's cache), which `dpo.*`
hyperparameters it takes, and whether it learns from pairs or from unpaired rows; `preference_loss` hands each
function exactly those. A pair loss takes a batch of `PairLogps` (summed log-probs of the chosen and rejected
responses, and their scored lengths) and returns per-pair losses and the implicit rewards of the chosen and rejected
responses; KTO, the unpaired loss, takes `UnpairedLogps` (each row's response, desirable or not, and a mismatched
response for its KL estimate) and returns per-row losses, the rows' implicit rewards and the KL estimate.
`preference_loss` detaches all but the losses (they are diagnostics). `_margin` below is the policy's log-ratio
margin minus the reference's: (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(losses, chosen_rewards, rejected_rewards), each of shape (B,)."""


@dataclass(frozen=True)
class PairLogps:
    """What a DPO-family loss may read of a batch of pairs. Each field's shape: (B,).

    Log-probs are summed over each response's scored tokens (its EOS included); `*_lengths` count those tokens. The
    reference's are None for a batch trained with a reference-free loss (none were read).
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    reference_chosen_logps: torch.Tensor | None = None
    reference_rejected_logps: torch.Tensor | None = None


@dataclass(frozen=True)
class UnpairedLogps:
    """What KTO reads of a batch of unpaired rows. Each field's shape: (B,).

    `policy_logps` / `reference_logps`: each row's response, summed over its scored tokens; `policy_kl_logps` /
    `reference_kl_logps`: a response from another prompt's row scored after this row's prompt (the mismatched pairs
    of KTO's KL estimate); `desirable`: the row's label (bool).
    """

    policy_logps: torch.Tensor
    policy_kl_logps: torch.Tensor
    reference_logps: torch.Tensor
    reference_kl_logps: torch.Tensor
    desirable: torch.Tensor


def _margin(pair: PairLogps) -> torch.Tensor:
    policy_logratios = pair.policy_chosen_logps - pair.policy_rejected_logps
    return policy_logratios - (pair.reference_chosen_logps - pair.reference_rejected_logps)


def _rewards(pair: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards beta * (log pi(y) - log ref(y)) of the chosen and rejected responses."""
    chosen = beta * (pair.policy_chosen_logps - pair.reference_chosen_logps)
    return chosen, beta * (pair.policy_rejected_logps - pair.reference_rejected_logps)


def _sigmoid(pair: PairLogps, *, beta: float, label_smoothing: float) -> Losses:
    # DPO, Rafailov et al. 2023 eq. 7; with label_smoothing > 0 the conservative cDPO (Mitchell 2023).
    logits = _margin(pair)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, *_rewards(pair, beta)


def _robust(pair: PairLogps, *, beta: float, label_smoothing: float) -> Losses:
    # Robust DPO, Chowdhury et al. 2024 eq. 8: unbiased under label-flip rate `label_smoothing` (< 0.5).
    logits = _margin(pair)
    flipped = -F.logsigmoid(beta * logits) * (1 - label_smoothing) + F.logsigmoid(-beta * logits) * label_smoothing
    return flipped / (1 - 2 * label_smoothing), *_rewards(pair, beta)


def _hinge(pair: PairLogps, *, beta: float) -> Losses:
    # SLiC-HF, Zhao et al. 2023: a hinge on the scaled margin.
    return torch.relu(1 - beta * _margin(pair)), *_rewards(pair, beta)


def _ipo(pair: PairLogps, *, beta: float) -> Losses:
    # IPO, Azar et al. 2023 eq. 17: regress the margin to 1 / (2 beta) (beta plays tau's role), on log-probs averaged
    # per token, as the authors' and TRL's implementations do (on summed ones a beta would not carry over).
    averaged = PairLogps(
        pair.policy_chosen_logps / pair.chosen_lengths,
        pair.policy_rejected_logps / pair.rejected_lengths,
        pair.chosen_lengths,
        pair.rejected_lengths,
        pair.reference_chosen_logps / pair.chosen_lengths,
        pair.reference_rejected_logps / pair.rejected_lengths,
    )
    return (_margin(averaged) - 1 / (2 * beta)) ** 2, *_rewards(averaged, beta)


def _simpo(pair: PairLogps, *, beta: float, simpo_gamma: float) -> Losses:
    # SimPO, Meng et al. 2024 eq. 6: -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma).
    chosen_rewards = beta * (pair.policy_chosen_logps / pair.chosen_lengths)
    rejected_rewards = beta * (pair.policy_rejected_logps / pair.rejected_lengths)
    return -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma), chosen_rewards, rejected_rewards


def _orpo(pair: PairLogps, *, orpo_lambda: float) -> Losses:
    # ORPO, Hong et al. 2024 eq. 6-7: the chosen response's NLL plus lambda * -log sigmoid(log odds ratio), with
    # odds(y) = P(y) / (1 - P(y)) and P(y) = exp(mean token log-prob). log(1 - e^x) as log(-expm1(x)), stable near 0.
    chosen = pair.policy_chosen_logps / pair.chosen_lengths
    rejected = pair.policy_rejected_logps / pair.rejected_lengths
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    losses = -chosen - orpo_lambda * F.logsigmoid(log_odds)
    return losses, orpo_lambda * chosen, orpo_lambda * rejected


def _kto(rows: UnpairedLogps, *, beta: float, kto_lambda_d: float, kto_lambda_u: float) -> Losses:
    # KTO, Ethayarajh et al. 2024 eq. 8: with r = log pi(y|x) - log ref(y|x) and the reference point
    # z0 = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)) on mismatched (x, y'), detached, a desirable
    # row loses lambda_D * (1 - sigmoid(beta * (r - z0))), an undesirable one lambda_U * (1 - sigmoid(beta * (z0 - r))).
    logratios = rows.policy_logps - rows.reference_logps
    kl = (rows.policy_kl_logps - rows.reference_kl_logps).mean().clamp(min=0).detach()
    desirable = rows.desirable.bool()
    losses = torch.where(
        desirable,
        kto_lambda_d * (1 - torch.sigmoid(beta * (logratios - kl))),
        kto_lambda_u * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    return losses, beta * logratios, kl.expand_as(logratios)


@dataclass(frozen=True)
class PreferenceLoss:
    """One loss of the family: its function, whether it reads the reference's log-probs, and the `dpo.*`
    hyperparameters it takes."""

    fn: Callable[..., Losses]
    needs_reference: bool
    params: tuple[str, ...]
    unpaired: bool = False
    """Learns from unpaired rows (`UnpairedLogps`) rather than pairs."""


DPO_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(_sigmoid, needs_reference=True, params=("beta", "label_smoothing")),
    "robust": PreferenceLoss(_robust, needs_reference=True, params=("beta", "label_smoothing")),
    "hinge": PreferenceLoss(_hinge, needs_reference=True, params=("beta",)),
    "ipo": PreferenceLoss(_ipo, needs_reference=True, params=("beta",)),
    "simpo": PreferenceLoss(_simpo, needs_reference=False, params=("beta", "simpo_gamma")),
    "orpo": PreferenceLoss(_orpo, needs_reference=False, params=("orpo_lambda",)),
    "kto": PreferenceLoss(_kto, needs_reference=True, params=("beta", "kto_lambda_d", "kto_lambda_u"), unpaired=True),
}


def _entry(loss: str) -> PreferenceLoss:
    if loss not in DPO_LOSSES:
        raise ValueError(f"dpo.loss: unknown loss {loss!r}; valid: {', '.join(sorted(DPO_LOSSES))}")
    return DPO_LOSSES[loss]


def needs_reference(loss: str) -> bool:
    """Whether `dpo.loss` = `loss` reads the reference's log-probs (SimPO and ORPO are reference-free)."""
    return _entry(loss).needs_reference


def is_unpaired(loss: str) -> bool:
    """Whether `dpo.loss` = `loss` learns from unpaired rows (KTO) rather than pairs."""
    return _entry(loss).unpaired


def preference_loss(pair: PairLogps | UnpairedLogps, *, loss: str, **hyperparameters: float) -> Losses:
    """Per-pair (or, for KTO, per-row) loss `loss` of the DPO family and its detached diagnostics.

    Args:
        pair: the batch's log-probs and lengths (`PairLogps`), or its unpaired rows' (`UnpairedLogps`, for the
            losses whose entry says `unpaired`); the reference's are needed by the losses that read them.
        loss: a key of `DPO_LOSSES` (`dpo.loss`).
        hyperparameters: `dpo.*` values by name (beta, label_smoothing, simpo_gamma, orpo_lambda, kto_lambda_d,
            kto_lambda_u); each loss takes the ones its entry names.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each of shape (B,); for KTO (losses, rewards, kl): each row's
        implicit reward beta * (log pi(y) - log ref(y)) and the batch's KL estimate z0, repeated per row.
    """
    entry = _entry(loss)
    if entry.unpaired != isinstance(pair, UnpairedLogps):
        kind = "unpaired rows" if entry.unpaired else "pairs"
        raise ValueError(f"dpo.loss: {loss!r} learns from {kind}, and the batch holds {type(pair).__name__}")
    if isinstance(pair, UnpairedLogps):
        losses, rewards, kl = entry.fn(pair, **{name: hyperparameters[name] for name in entry.params})
        return losses, rewards.detach(), kl.detach()
    if entry.needs_reference and pair.reference_chosen_logps is None:
        raise ValueError(f"dpo.loss: {loss!r} reads the reference's log-probs, and the batch carries none")
    losses, chosen_rewards, rejected_rewards = entry.fn(pair, **{name: hyperparameters[name] for name in entry.params})
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
