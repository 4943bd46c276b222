"""Reward shaping (`pipeline.losses.rewards.shape_rewards`) against hand-computed values."""

import torch

from pipeline.losses.rewards import RewardWeights, last_policy_token, shape_rewards

# Two responses, token-aligned over 4 positions: the first spans positions 1-2 and ended with EOS, the second 1-3
# and was cut off.
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
ENDED = torch.tensor([True, False])
KL = torch.tensor([[0.0, 0.1, 0.2, 0.0], [0.0, 0.3, -0.1, 0.4]])  # zero off the responses
WEIGHTS = RewardWeights(
    reward_mean=1.0, reward_std=2.0, reward_clip=0.5, reward_model_weight=2.0, judge_weight=2.0, missing_eos_penalty=1.0
)


def _shape(**changes):
    rm_scores, judge_scores = torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.25])
    args = {"reward_model_scores": rm_scores, "judge_scores": judge_scores, "weights": WEIGHTS, "kl_coef": 0.5}
    return shape_rewards(KL, MASK, ENDED, **{**args, **changes})


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


def test_an_environment_span_gets_neither_kl_nor_the_score_and_the_episode_reward_is_weighted_in():
    # One episode over 7 positions: policy tokens at 1-2 (a tool call), the environment's answer at 3-4, policy
    # tokens at 5-6 (the final answer, ended with EOS). The KL estimate is nonzero on the answer's positions too (as
    # a careless caller would leave it); the episode's reward 1 from the environment counts 0.5.
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    kl = torch.tensor([[0.0, 0.2, 0.4, 0.8, 0.8, 0.2, 0.6]])
    weights = RewardWeights(judge_weight=1.0, env_weight=0.5, missing_eos_penalty=1.0)
    shaped = shape_rewards(
        kl,
        mask,
        torch.tensor([True]),
        reward_model_scores=None,
        judge_scores=torch.tensor([0.25]),
        weights=weights,
        kl_coef=0.5,
        env_rewards=torch.tensor([1.0]),
    )
    torch.testing.assert_close(shaped.scores, torch.tensor([0.75]))  # judge 0.25 + 0.5 x 1
    expected = torch.tensor([[0.0, -0.1, -0.2, 0.0, 0.0, -0.1, -0.3 + 0.75]])
    torch.testing.assert_close(shaped.rewards, expected)
    assert last_policy_token(mask).tolist() == [6]
    assert last_policy_token(torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])).tolist() == [1, 0]


def test_an_ensembles_heads_are_normalised_clipped_and_combined_by_hand():
    weights = RewardWeights(head_means=(0.0, 1.0, -1.0), head_stds=(1.0, 2.0, 1.0), reward_clip=3.0)
    raw = torch.tensor([[1.0, 3.0, 0.0], [2.0, -9.0, -1.0]])  # normalised: (1, 1, 1) and (2, -5 -> clip -3, 0)
    mask, ended = MASK, torch.tensor([True, True])
    expected = {
        "mean": [1.0, -1.0 / 3.0],
        "min": [1.0, -3.0],
        "mean_minus_std": [1.0, -1.0 / 3.0 - 2.0 * torch.tensor([2.0, -3.0, 0.0]).std().item()],
    }
    for combine, scores in expected.items():
        shaped = shape_rewards(
            KL,
            mask,
            ended,
            reward_model_scores=raw,
            judge_scores=torch.zeros(2),
            weights=RewardWeights(**{**weights.__dict__, "combine": combine, "std_coef": 2.0}),
            kl_coef=None,
        )
        torch.testing.assert_close(shaped.scores, torch.tensor(scores), msg=combine)
        torch.testing.assert_close(shaped.spread, torch.tensor([0.0, torch.tensor([2.0, -3.0, 0.0]).std().item()]))
    assert _shape().spread is None  # one head: no spread to speak of
