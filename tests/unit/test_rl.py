import math

import pytest
import torch

from pipeline.losses.rl import (
    LOSS_AGGREGATION,
    AdaptiveKLController,
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    discounted_returns,
    estimate_advantages,
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


# Two prompts x three samples, consecutive: sequence rewards (1, 2, 3) and (0, 0, 3).
GROUPED = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])


def _last_token_rewards(scores: torch.Tensor, length: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.zeros(len(scores), length)
    rewards[:, -1] = scores
    return rewards, torch.ones(len(scores), length)


def test_grpo_divides_the_group_centred_reward_by_the_group_std():
    advantages, returns = estimate_advantages("grpo", *_last_token_rewards(GROUPED), group_size=3)
    # group 1: mean 2, unbiased std 1; group 2: mean 1, deviations (-1, -1, 2), unbiased std sqrt(6 / 2)
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001] + [d / (math.sqrt(3) + 1e-4) for d in (-1.0, -1.0, 2.0)]
    torch.testing.assert_close(advantages, torch.tensor(expected)[:, None].expand(6, 2))
    assert returns is None


def test_dr_grpo_keeps_the_group_centred_reward_unscaled():
    advantages, _ = estimate_advantages("dr_grpo", *_last_token_rewards(GROUPED), group_size=3)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0]))


def test_rloo_subtracts_the_mean_of_the_other_samples():
    advantages, _ = estimate_advantages("rloo", *_last_token_rewards(GROUPED), group_size=3)
    # 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2; 0 - (0 + 3) / 2, twice; 3 - 0
    torch.testing.assert_close(advantages[:, 1], torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]))


def test_group_estimators_sum_each_rows_response_rewards_and_leave_the_rest_zero():
    # per-token KL penalties of -0.5 on the first response token; row 4's response is one token (its 2nd is padding)
    rewards = torch.tensor([[-0.5, 1.0], [-0.5, 2.0], [-0.5, 3.0], [-0.5, 0.5], [-0.5, 0.0], [-0.5, 3.0]])
    mask = torch.ones(6, 2)
    mask[3, 1] = 0
    advantages, _ = estimate_advantages("rloo", rewards, mask, group_size=3)
    # sequence rewards (0.5, 1.5, 2.5) and (-0.5, -0.5, 2.5): the padded 0.5 is not counted
    torch.testing.assert_close(advantages[:, 0], torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]))
    assert advantages[3, 1] == 0


def test_reinforce_pp_whitens_the_reward_to_go_over_the_batch():
    rewards, mask = _last_token_rewards(GROUPED)
    rewards[:, 0] = -0.5  # a per-token KL penalty on the first response token
    advantages, returns = estimate_advantages("reinforce_pp", rewards, mask, gamma=1.0)
    # reward-to-go: first token s - 0.5, last token s. All 12: mean 15 / 12 = 1.25, squared deviations sum to
    # 9.875 + 9.875, unbiased std sqrt(19.75 / 11)
    std = math.sqrt(19.75 / 11)
    expected = torch.stack([(GROUPED - 0.5 - 1.25) / std, (GROUPED - 1.25) / std], dim=1)
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)
    assert returns is None


def test_discounted_returns_stop_at_the_mask():
    returns = discounted_returns(torch.tensor([[9.0, 1.0, 0.0, 2.0, 9.0]]), torch.tensor([[0, 1, 1, 1, 0]]), gamma=0.5)
    # 2; 0 + 0.5 * 2 = 1; 1 + 0.5 * 1 = 1.5; prompt and padding 0
    torch.testing.assert_close(returns, torch.tensor([[0.0, 1.5, 1.0, 2.0, 0.0]]))


def test_gae_through_the_dispatcher_is_whitened_gae():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), torch.full((2, 3), 0.5)
    advantages, returns = estimate_advantages("gae", rewards, torch.ones(2, 3), values=values, gamma=1.0, lam=0.95)
    raw, raw_returns = gae_advantages(rewards, values, torch.ones(2, 3), gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, masked_whiten(raw, torch.ones(2, 3)))
    torch.testing.assert_close(returns, raw_returns)


def test_estimators_refuse_what_they_cannot_use():
    rewards, mask = _last_token_rewards(GROUPED)
    with pytest.raises(ValueError, match="needs groups of >= 2 samples per prompt; got 6 rows in groups of 1"):
        estimate_advantages("grpo", rewards, mask, group_size=1)
    with pytest.raises(ValueError, match="gae' needs the value model"):
        estimate_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="unknown 'ppo2'"):
        estimate_advantages("ppo2", rewards, mask)


def test_loss_aggregations_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 7.0], [3.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(aggregate_loss(per_token, mask, "token_mean", max_tokens=4)) == pytest.approx((1 + 2 + 3) / 3)
    assert float(aggregate_loss(per_token, mask, "sequence_mean", max_tokens=4)) == pytest.approx((1.5 + 3) / 2)
    assert float(aggregate_loss(per_token, mask, "token_sum", max_tokens=4)) == pytest.approx(6 / (2 * 4))
    # Dr. GRPO's point: per-token gradients of a 1-token and a 3-token answer. GRPO's sequence mean gives each
    # token of the short answer 3x the weight; the constant token-sum denominator weighs every token alike.
    logits = torch.zeros(2, 3, requires_grad=True)
    lengths = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    for how, short, long in (("sequence_mean", 1 / 2, 1 / 6), ("token_sum", 1 / 8, 1 / 8)):
        (grad,) = torch.autograd.grad(aggregate_loss(logits, lengths, how, max_tokens=4), logits)
        assert (float(grad[0, 0]), float(grad[1, 0])) == pytest.approx((short, long)), how
    assert LOSS_AGGREGATION["grpo"] == "sequence_mean" and LOSS_AGGREGATION["dr_grpo"] == "token_sum"


# A multi-turn trajectory, token-aligned: policy tokens at 0-1 (a tool call), the environment's answer at 2-3, a
# policy token at 4 (the final answer). The answer's positions hold junk rewards and values: they must count for
# nothing, and must not cut the recursion between the two policy spans.
TURNS_MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
TURNS_REWARDS = torch.tensor([[0.0, 0.0, 9.0, 9.0, 1.0]])


def test_gae_steps_over_an_environment_span_by_hand():
    values = torch.tensor([[0.5, 0.25, 7.0, 7.0, 0.5]])
    advantages, returns = gae_advantages(TURNS_REWARDS, values, TURNS_MASK, gamma=1.0, lam=0.5)
    # over the policy tokens alone (rewards 0, 0, 1; values 0.5, 0.25, 0.5):
    # t=4: delta = 1 - 0.5 = 0.5, A = 0.5; t=1: delta = 0 + 0.5 - 0.25 = 0.25, A = 0.25 + 0.5 x 0.5 = 0.5;
    # t=0: delta = 0 + 0.25 - 0.5 = -0.25, A = -0.25 + 0.5 x 0.5 = 0
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.5, 0.75, 0.0, 0.0, 1.0]]))


def test_reinforce_pp_returns_cross_an_environment_span_by_hand():
    # G_4 = 1, G_1 = 0 + 0.5 x G_4 = 0.5, G_0 = 0 + 0.5 x G_1 = 0.25 (a return cut at the span would make G_1 = 0)
    returns = discounted_returns(TURNS_REWARDS, TURNS_MASK, gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[0.25, 0.5, 0.0, 0.0, 1.0]]))
