"""The DPO family's table (`pipeline.losses.dpo.DPO_LOSSES`) against hand-computed values."""

import math

import pytest
import torch

from pipeline.losses.dpo import DPO_LOSSES, PairLogps, UnpairedLogps, is_unpaired, needs_reference, preference_loss

LOG2 = math.log(2)
DEFAULTS = {
    "beta": 0.1,
    "label_smoothing": 0.0,
    "simpo_gamma": 0.5,
    "orpo_lambda": 0.1,
    "kto_lambda_d": 1.0,
    "kto_lambda_u": 1.0,
}


def _pair(chosen, rejected, reference_chosen=0.0, reference_rejected=0.0, lengths=(1.0, 1.0)):
    t = lambda *values: torch.tensor([float(v) for v in values])  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(lengths[0]), t(lengths[1]), t(reference_chosen), t(reference_rejected))


def _loss(policy_margin, reference_margin, loss="sigmoid", **hyperparameters):
    pair = _pair(policy_margin, 0.0, reference_margin, 0.0)
    losses, chosen, rejected = preference_loss(pair, loss=loss, **{**DEFAULTS, **hyperparameters})
    return float(losses[0]), chosen, rejected


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_equal_logps_give_log2_for_any_beta(beta):
    logps, lengths = torch.tensor([-3.0, -10.0]), torch.tensor([2.0, 5.0])
    losses, _, _ = preference_loss(
        PairLogps(logps, logps, lengths, lengths, logps, logps), loss="sigmoid", **{**DEFAULTS, "beta": beta}
    )
    torch.testing.assert_close(losses, torch.full((2,), LOG2))


def test_hand_values():
    # beta 0.1, policy margin 2, reference margin 0: log(1 + e^-0.2)
    assert _loss(2.0, 0.0, beta=0.1)[0] == pytest.approx(0.598139, abs=1e-6)
    # only the difference of margins matters
    assert _loss(5.0, 3.0, beta=0.1)[0] == pytest.approx(0.598139, abs=1e-6)
    # cDPO with label smoothing 0.5 is indifferent: log 2
    assert _loss(0.0, 0.0, beta=0.1, label_smoothing=0.5)[0] == pytest.approx(LOG2)
    # IPO with zero logits and beta 0.1: (0 - 1 / 0.2)^2 = 25
    assert _loss(0.0, 0.0, beta=0.1, loss="ipo")[0] == pytest.approx(25.0)
    # SLiC hinge: relu(1 - 0.1 * 2) = 0.8
    assert _loss(2.0, 0.0, beta=0.1, loss="hinge")[0] == pytest.approx(0.8)
    # robust with no assumed noise is plain DPO
    assert _loss(2.0, 0.0, beta=0.1, loss="robust")[0] == pytest.approx(0.598139, abs=1e-6)
    # robust with eps 0.2: (0.8 * 0.598139 - 0.2 * 0.798139) / 0.6
    assert _loss(2.0, 0.0, beta=0.1, loss="robust", label_smoothing=0.2)[0] == pytest.approx(
        (0.8 * 0.598139 - 0.2 * 0.798139) / 0.6, abs=1e-6
    )


def test_ipo_regresses_the_margin_of_per_token_averaged_log_probs():
    # chosen -4 over 2 tokens (mean -2), rejected -9 over 3 (mean -3); reference chosen -6 / 2 = -3, rejected
    # -6 / 3 = -2: margin (-2 + 3) - (-3 + 2) = 2; beta 0.1, target 1 / 0.2 = 5: loss (2 - 5)^2 = 9. (On summed
    # log-probs the margin is (-4 + 9) - (-6 + 6) = 5 and the loss 0.)
    pair = _pair(-4.0, -9.0, -6.0, -6.0, lengths=(2.0, 3.0))
    losses, chosen, rejected = preference_loss(pair, loss="ipo", beta=0.1)
    assert float(losses[0]) == pytest.approx(9.0)
    assert (float(chosen[0]), float(rejected[0])) == pytest.approx((0.1, -0.1))  # beta x (mean - reference mean)


def test_rewards_are_detached_and_scaled_by_beta():
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    policy_rejected = torch.tensor([-4.0], requires_grad=True)
    ones = torch.ones(1)
    pair = PairLogps(policy_chosen, policy_rejected, ones, ones, torch.tensor([-2.0]), torch.tensor([-3.0]))
    losses, chosen, rejected = preference_loss(pair, loss="sigmoid", **{**DEFAULTS, "beta": 0.5})
    assert not chosen.requires_grad and not rejected.requires_grad and losses.requires_grad
    torch.testing.assert_close(chosen, torch.tensor([0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5]))


def test_unknown_loss_lists_valid_ones():
    with pytest.raises(
        ValueError, match=r"dpo\.loss: unknown loss 'cpo'; valid: hinge, ipo, kto, orpo, robust, sigmoid, simpo"
    ):
        _loss(0.0, 0.0, loss="cpo")
    with pytest.raises(ValueError, match=r"dpo\.loss: unknown loss 'cpo'"):
        needs_reference("cpo")


def test_one_table_answers_which_losses_read_the_reference_and_what_each_takes():
    assert {name: entry.needs_reference for name, entry in DPO_LOSSES.items()} == {
        "sigmoid": True, "robust": True, "hinge": True, "ipo": True, "simpo": False, "orpo": False, "kto": True,
    }  # fmt: skip
    assert [name for name in DPO_LOSSES if is_unpaired(name)] == ["kto"]
    assert DPO_LOSSES["hinge"].params == ("beta",) and DPO_LOSSES["orpo"].params == ("orpo_lambda",)
    no_reference = PairLogps(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match=r"dpo\.loss: 'sigmoid' reads the reference's log-probs, and the batch"):
        preference_loss(no_reference, loss="sigmoid", **DEFAULTS)
    preference_loss(no_reference, loss="simpo", **DEFAULTS)  # reference-free: nothing else needed


def test_simpo_hand_value_is_length_normalised_and_reference_free():
    # chosen: -4 over 2 tokens (mean -2); rejected: -9 over 3 tokens (mean -3); beta 2, gamma 0.5:
    # margin 2 * (-2) - 2 * (-3) - 0.5 = 1.5, loss log(1 + e^-1.5) = 0.201413
    pair = PairLogps(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([2.0]), torch.tensor([3.0]))
    losses, chosen, rejected = preference_loss(pair, loss="simpo", beta=2.0, simpo_gamma=0.5)
    assert float(losses[0]) == pytest.approx(0.201413, abs=1e-6)
    assert (float(chosen[0]), float(rejected[0])) == (-4.0, -6.0)


def test_orpo_hand_value_is_nll_plus_odds_ratio_term():
    # mean log-probs -0.5 (chosen) and -1.0 (rejected): log odds -0.5 - log(1 - e^-0.5) = 0.432752 and
    # -1 - log(1 - e^-1) = -0.541325, difference 0.974077; loss = 0.5 (chosen NLL) + 0.1 * log(1 + e^-0.974077)
    # = 0.532030
    pair = PairLogps(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([2.0]), torch.tensor([3.0]))
    losses, _, _ = preference_loss(pair, loss="orpo", orpo_lambda=0.1)
    assert float(losses[0]) == pytest.approx(0.532030, abs=1e-6)


def _rows(policy, reference, policy_kl, reference_kl, desirable):
    t = lambda values: torch.tensor([float(v) for v in values], requires_grad=True)  # noqa: E731
    return UnpairedLogps(t(policy), t(policy_kl), t(reference), t(reference_kl), torch.tensor(desirable))


def test_kto_hand_values_for_both_labels_the_weights_and_the_kl_reference_point():
    # log-ratios r = 1 (desirable), -1 and 0 (undesirable); mismatched log-ratios 1, 0, 2: z0 = mean = 1.
    # beta 0.5, lambda_D 2, lambda_U 1: 2 (1 - sigmoid(0.5 (1 - 1))) = 1; 1 - sigmoid(0.5 (1 + 1)) = 0.268941;
    # 1 - sigmoid(0.5 (1 - 0)) = 0.377541
    rows = _rows([-2, -5, -4], [-3, -4, -4], [-6, -7, -5], [-7, -7, -7], [True, False, False])
    losses, rewards, kl = preference_loss(rows, loss="kto", beta=0.5, kto_lambda_d=2.0, kto_lambda_u=1.0)
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.268941, 0.377541]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards, torch.tensor([0.5, -0.5, 0.0]))  # beta x r, detached
    torch.testing.assert_close(kl, torch.ones(3))
    assert not rewards.requires_grad and not kl.requires_grad
    losses.sum().backward()
    assert rows.policy_kl_logps.grad is None or not rows.policy_kl_logps.grad.any()  # z0 is a constant: no gradient
    assert rows.policy_logps.grad[0] < 0 < rows.policy_logps.grad[1]  # up for desirable, down for undesirable


def test_kto_clamps_a_negative_kl_estimate_to_zero():
    # mismatched log-ratios -1, -2, 0: mean -1, z0 = 0. Then 2 (1 - sigmoid(0.5)) = 0.755081,
    # 1 - sigmoid(0.5) = 0.377541 (r = -1), 1 - sigmoid(0) = 0.5 (r = 0)
    rows = _rows([-2, -5, -4], [-3, -4, -4], [-6, -7, -5], [-5, -5, -5], [True, False, False])
    losses, _, kl = preference_loss(rows, loss="kto", beta=0.5, kto_lambda_d=2.0, kto_lambda_u=1.0)
    torch.testing.assert_close(losses, torch.tensor([0.755081, 0.377541, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl, torch.zeros(3))


def test_a_pair_loss_refuses_unpaired_rows_and_kto_refuses_pairs():
    rows = _rows([-1], [-1], [-1], [-1], [True])
    with pytest.raises(ValueError, match=r"dpo\.loss: 'sigmoid' learns from pairs, and the batch holds UnpairedLogps"):
        preference_loss(rows, loss="sigmoid", **DEFAULTS)
    pair = _pair(0.0, 0.0)
    with pytest.raises(ValueError, match=r"dpo\.loss: 'kto' learns from unpaired rows, and the batch holds PairLogps"):
        preference_loss(pair, loss="kto", **DEFAULTS)
