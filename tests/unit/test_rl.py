import math

import pytest
import torch

from pipeline.rl import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    gae_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
)


def test_gae_hand_values():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.45125, 0.475, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.95125, 0.975, 1.0]]))


def test_gae_ignores_prompt_and_padding_positions():
    # row: [prompt, r1, r2, r3, pad]; the response is the same episode as above, shifted by one
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    advantages, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.45125, 0.475, 0.5, 0.0]]))


def test_masked_whiten_uses_only_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    kept = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)
    assert masked_mean(values, mask) == pytest.approx(2.0)


def test_kl_estimators_on_known_distributions():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logps, ref_logps = p.log()[tokens][None], q.log()[tokens][None]
    k1, k2, k3 = (float(kl_estimate(logps, ref_logps, k).mean()) for k in ("k1", "k2", "k3"))
    assert k1 == pytest.approx(exact, abs=0.01)  # unbiased
    assert k3 == pytest.approx(exact, abs=0.01)  # unbiased
    assert k2 == pytest.approx(exact, rel=0.25)  # biased, close when p and q are close
    assert kl_estimate(logps, ref_logps, "k3").min() >= 0  # never negative
    assert kl_estimate(logps, ref_logps, "k1").min() < 0  # k1 per token can be
    with pytest.raises(ValueError, match=r"ppo\.kl_estimator: unknown 'k4'; valid: k1, k2, k3"):
        kl_estimate(logps, ref_logps, "k4")


def test_clipped_policy_loss_hand_cases():
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = clipped_policy_loss(new, old, advantages, mask, cliprange=0.2)
    # per token: max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; max(1.1, 1.1) = 1.1
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)  # only the first token is clipped
    assert float(stats["ratio"]) == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    assert float(stats["approxkl"]) == pytest.approx(0.5 * float((new**2).mean()))


def test_clipped_value_loss_hand_case():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange=0.2)
    # token 0: max((1-0)^2, (0.2-0)^2) = 1; token 1: max((0-1)^2, (0-1)^2) = 1; 0.5 * mean = 0.5
    assert float(loss) == pytest.approx(0.5)
    assert float(clipfrac) == 0.0


def test_adaptive_controller_update_rule():
    ctl = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    # KL 9 is 50 % over target: the error is clipped to 0.2, times 256 / 10000
    assert ctl.update(9.0, n_steps=256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    assert ctl.update(3.0, n_steps=100) == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    assert ctl.update(6.0, n_steps=100) == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    assert math.isclose(AdaptiveKLController(1.0, 6.0, 100).update(6.6, 10), 1 + 0.1 * 10 / 100)
