"""Reward shaping (`pipeline.losses.rewards.shape_rewards`) against hand-computed values."""

import torch

from pipeline.losses.rewards import RewardWeights, shape_rewards

# Two responses, token-aligned over 4 positions: the first spans positions 1-2 and ended with EOS, the second 1-3
# and was cut off.
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
LAST = torch.tensor([2, 3])
ENDED = torch.tensor([True, False])
KL = torch.tensor([[0.0, 0.1, 0.2, 0.0], [0.0, 0.3, -0.1, 0.4]])  # zero off the responses
WEIGHTS = RewardWeights(
    reward_mean=1.0, reward_std=2.0, reward_clip=0.5, reward_model_weight=2.0, judge_weight=2.0, missing_eos_penalty=1.0
)


def _shape(**changes):
    rm_scores, judge_scores = torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.25])
    args = {"reward_model_scores": rm_scores, "judge_scores": judge_scores, "weights": WEIGHTS, "kl_coef": 0.5}
    return shape_rewards(KL, MASK, LAST, ENDED, **{**args, **changes})


def test_every_part_of_the_score_and_the_kl_penalty_by_hand():
    shaped = _shape()
    # reward model: (3 - 1) / 2 = 1 and (-1 - 1) / 2 = -1, clipped to +-0.5, weighted x2: 1, -1;
    # judge x2: +1, +0.5 -> 2, -0.5; the second did not end with EOS: -1 -> 2, -1.5
    torch.testing.assert_close(shaped.scores, torch.tensor([2.0, -1.5]))
    # KL penalty -0.5 x KL on every response token; each score added at its response's last token
    torch.testing.assert_close(shaped.non_score, torch.tensor([[0.0, -0.05, -0.1, 0.0], [0.0, -0.15, 0.05, -0.2]]))
    torch.testing.assert_close(shaped.rewards, torch.tensor([[0.0, -0.05, 1.9, 0.0], [0.0, -0.15, 0.05, -1.7]]))


def test_kl_in_the_loss_leaves_the_score_alone_at_the_last_token():
    shaped = _shape(kl_coef=None)
    torch.testing.assert_close(shaped.rewards, torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.5]]))
    assert not shaped.non_score.any()


def test_without_a_reward_model_the_judge_and_the_eos_penalty_make_the_score():
    # RLVR: ppo.reward_model_weight 0, no reward model run: 2 x 0.5 = 1 and 2 x 0.25 - 1 = -0.5
    shaped = _shape(reward_model_scores=None, kl_coef=None)
    torch.testing.assert_close(shaped.scores, torch.tensor([1.0, -0.5]))


def test_whitening_scales_the_response_tokens_to_unit_variance_keeping_their_mean():
    import statistics

    values = [-0.05, 1.9, -0.15, 0.05, -1.7]  # the rewards on the response tokens, row by row (first test)
    mean, sd = statistics.mean(values), statistics.stdev(values)
    expected = torch.zeros(2, 4)
    expected[MASK.bool()] = torch.tensor([(v - mean) / sd + mean for v in values])
    torch.testing.assert_close(_shape(whiten=True).rewards, expected)
