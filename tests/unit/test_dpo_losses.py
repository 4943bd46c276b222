import math

import pytest
import torch

from pipeline.losses.dpo import DPO_LOSSES, dpo_loss, reference_free_loss

LOG2 = math.log(2)


def _loss(policy_margin, reference_margin, **kwargs):
    zero = torch.zeros(1)
    losses, chosen, rejected = dpo_loss(
        torch.tensor([policy_margin]), zero, torch.tensor([reference_margin]), zero, **kwargs
    )
    return float(losses[0]), chosen, rejected


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_equal_logps_give_log2_for_any_beta(beta):
    logps = torch.tensor([-3.0, -10.0])
    losses, _, _ = dpo_loss(logps, logps, logps, logps, beta=beta)
    torch.testing.assert_close(losses, torch.full((2,), LOG2))


def test_hand_values():
    # beta 0.1, policy margin 2, reference margin 0: log(1 + e^-0.2)
    assert _loss(2.0, 0.0, beta=0.1)[0] == pytest.approx(0.598139, abs=1e-6)
    # only the difference of margins matters
    assert _loss(5.0, 3.0, beta=0.1)[0] == pytest.approx(0.598139, abs=1e-6)
    # cDPO with label smoothing 0.5 is indifferent: log 2
    assert _loss(0.0, 0.0, beta=0.1, label_smoothing=0.5)[0] == pytest.approx(LOG2)
    # IPO with zero logits and beta 0.1: (0 - 1 / 0.2)^2 = 25
    assert _loss(0.0, 0.0, beta=0.1, loss_type="ipo")[0] == pytest.approx(25.0)
    # SLiC hinge: relu(1 - 0.1 * 2) = 0.8
    assert _loss(2.0, 0.0, beta=0.1, loss_type="hinge")[0] == pytest.approx(0.8)
    # robust with no assumed noise is plain DPO
    assert _loss(2.0, 0.0, beta=0.1, loss_type="robust")[0] == pytest.approx(0.598139, abs=1e-6)
    # robust with eps 0.2: (0.8 * 0.598139 - 0.2 * 0.798139) / 0.6
    assert _loss(2.0, 0.0, beta=0.1, loss_type="robust", label_smoothing=0.2)[0] == pytest.approx(
        (0.8 * 0.598139 - 0.2 * 0.798139) / 0.6, abs=1e-6
    )


def test_rewards_are_detached_and_scaled_by_beta():
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    policy_rejected = torch.tensor([-4.0], requires_grad=True)
    losses, chosen, rejected = dpo_loss(
        policy_chosen, policy_rejected, torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5
    )
    assert not chosen.requires_grad and not rejected.requires_grad and losses.requires_grad
    torch.testing.assert_close(chosen, torch.tensor([0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5]))


def test_unknown_loss_lists_valid_ones():
    with pytest.raises(ValueError, match=r"dpo\.loss: unknown loss 'kto'; valid: hinge, ipo, robust, sigmoid"):
        _loss(0.0, 0.0, beta=0.1, loss_type="kto")


def test_table_holds_the_four_variants():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "robust"}


def test_simpo_hand_value_is_length_normalised_and_reference_free():
    # chosen: -4 over 2 tokens (mean -2); rejected: -9 over 3 tokens (mean -3); beta 2, gamma 0.5:
    # margin 2 * (-2) - 2 * (-3) - 0.5 = 1.5, loss log(1 + e^-1.5) = 0.201413
    losses, chosen, rejected = reference_free_loss(
        torch.tensor([-4.0]),
        torch.tensor([-9.0]),
        torch.tensor([2.0]),
        torch.tensor([3.0]),
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.5,
    )
    assert float(losses[0]) == pytest.approx(0.201413, abs=1e-6)
    assert (float(chosen[0]), float(rejected[0])) == (-4.0, -6.0)


def test_orpo_hand_value_is_nll_plus_odds_ratio_term():
    # mean log-probs -0.5 (chosen) and -1.0 (rejected): log odds -0.5 - log(1 - e^-0.5) = 0.432752 and
    # -1 - log(1 - e^-1) = -0.541325, difference 0.974077; loss = 0.5 (chosen NLL) + 0.1 * log(1 + e^-0.974077)
    # = 0.532030
    losses, _, _ = reference_free_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([2.0]),
        torch.tensor([3.0]),
        loss_type="orpo",
        beta=0.1,
        orpo_lambda=0.1,
    )
    assert float(losses[0]) == pytest.approx(0.532030, abs=1e-6)
    with pytest.raises(ValueError, match=r"dpo\.loss: 'sigmoid' is not reference-free; valid: simpo, orpo"):
        reference_free_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), loss_type="sigmoid", beta=0.1)
