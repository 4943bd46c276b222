"""Online DPO's labelling: the score composition it shares with PPO, best against worst, ties; the round sampler and
the pairs a checkpoint carries; the config rules."""

import math

import pytest
import torch

from pipeline.config import ConfigError, load_config, read_params
from pipeline.losses.rewards import RewardWeights, response_scores, shape_rewards
from pipeline.train.online import RoundSampler, best_worst_pairs, pack_pairs, round_measures, unpack_pairs
from tests.defaults import ROOT


def test_a_score_is_composed_as_ppo_composes_it():
    weights = RewardWeights(
        reward_mean=1.0, reward_std=2.0, reward_model_weight=0.5, judge_weight=2.0, missing_eos_penalty=1.5
    )
    raw = torch.tensor([3.0, -1.0, 1.0])
    judge = torch.tensor([0.25, 0.5, -0.5])
    ended = torch.tensor([True, True, False])
    scores, spread = response_scores(raw, judge, ended, weights)
    # 0.5 x (raw - 1) / 2 + 2 x judge - 1.5 x (no EOS)
    expected = [0.5 * 1.0 + 0.5, 0.5 * -1.0 + 1.0, 0.0 - 1.0 - 1.5]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert spread is None
    # PPO's shaped rewards carry the very same scores
    shaped = shape_rewards(
        torch.zeros(3, 2),
        torch.ones(3, 2),
        ended,
        reward_model_scores=raw,
        judge_scores=judge,
        weights=weights,
        kl_coef=0.1,
    )
    torch.testing.assert_close(shaped.scores, scores)


def test_an_ensembles_heads_are_normalised_each_then_combined():
    weights = RewardWeights(head_means=(0.0, 1.0), head_stds=(1.0, 2.0), combine="min", missing_eos_penalty=0.0)
    raw = torch.tensor([[2.0, 1.0], [-1.0, 5.0]])  # normalised: [2, 0], [-1, 2]
    scores, spread = response_scores(raw, torch.zeros(2), torch.tensor([True, True]), weights)
    torch.testing.assert_close(scores, torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(spread, torch.tensor([2.0, 3.0]).div(2).mul(math.sqrt(2)))


def test_each_prompt_pairs_its_best_against_its_worst():
    prompts = [[1, 2]] * 3 + [[3]] * 3
    completions = [[10], [11], [12], [20], [21], [22]]
    scores = [0.1, 0.9, 0.5, -0.2, -0.7, 0.4]
    golds = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    pairs, stats = best_worst_pairs(prompts, completions, scores, golds, 3)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == [([1, 2], [11], [10]), ([3], [22], [21])]
    assert [(p.chosen_gold, p.rejected_gold) for p in pairs] == [(2.0, 1.0), (6.0, 5.0)]
    assert [p.index for p in pairs] == [0, 1]
    assert stats == {"pairs": 2.0, "ties": 0.0, "score_gap": pytest.approx((0.8 + 1.1) / 2)}


def test_ties_give_no_pair_and_the_first_of_equals_is_taken():
    prompts = [[1]] * 3 + [[2]] * 3 + [[3]] * 3
    completions = [[5], [6], [7], [8], [9], [10], [11], [12], [12]]
    scores = [0.3, 0.3, 0.0, 0.2, 1.0, 1.0, 0.0, 0.9, 0.1]  # gaps 0.3, 0.8, 0.9
    golds = [0.0] * 9
    pairs, stats = best_worst_pairs(prompts, completions, scores, golds, 3)
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [([5], [7]), ([9], [8]), ([12], [11])]
    assert stats["ties"] == 0.0
    pairs, stats = best_worst_pairs(prompts, completions, scores, golds, 3, min_gap=0.85)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == [([3], [12], [11])]
    assert stats["ties"] == 2.0
    # an exact tie, and a best and worst of the same tokens, give none
    pairs, stats = best_worst_pairs([[1]] * 2 + [[2]] * 2, [[5], [6], [7], [7]], [0.4, 0.4, 0.9, 0.1], [0.0] * 4, 2)
    assert pairs == [] and stats == {"pairs": 0.0, "ties": 2.0, "score_gap": 0.0}
    with pytest.raises(ValueError, match="9 samples are not whole groups of k = 2"):
        best_worst_pairs(prompts, completions, scores, golds, 2)


def test_a_rounds_pairs_survive_a_checkpoint():
    prompts = [[1, 2]] * 2 + [[3]] * 2
    pairs, _ = best_worst_pairs(prompts, [[4, 5, 6], [7], [8], [9, 10]], [1.0, 0.0, 0.0, 2.0], [0.5, -0.5, 0.1, 0.7], 2)
    pairs = [
        type(p)(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.chosen_gold, p.rejected_gold, p.index, -3.5, -4.25)
        for p in pairs
    ]
    packed = pack_pairs(pairs)
    assert all(isinstance(v, torch.Tensor) for v in packed.values())  # loadable with weights_only=True
    assert unpack_pairs(packed) == pairs
    assert unpack_pairs(pack_pairs([])) == []


def test_the_round_sampler_yields_exactly_its_steps_and_resumes_where_it_stopped():
    lengths = [3, 5, 4, 6, 2]
    sampler = RoundSampler(lengths, batch_size=2, seed=7, steps=7, accumulate=1, rank=0, world=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7  # 3 batches a pass: passes repeat until the steps are served
    for start in (0, 3):  # each pass serves every pair once
        assert sorted(i for b in batches[start : start + 3] for i in b) == [0, 1, 2, 3, 4]
    assert batches[6] in batches[:3]  # the third pass, cut after one batch
    sampler.skip = 4
    assert list(sampler) == batches[4:]  # a resumed round
    assert list(sampler) == batches  # skipping once only
    accumulated = RoundSampler(lengths, batch_size=1, seed=7, steps=3, accumulate=2, rank=0, world=1)
    assert len(list(accumulated)) == len(accumulated) == 6


def test_round_measures_name_a_measurement():
    metrics = {
        "objective/gold_scores": 0.5,
        "objective/kl": 2.0,
        "objective/win_rate": 0.75,
        "objective/eos_rate": 1.0,
        "reference/gold_scores": 0.1,
    }
    assert round_measures(metrics) == {"gold_score": 0.5, "kl": 2.0, "win_rate": 0.75, "val_eos_rate": 1.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dpo": {"online_rounds": 3, "loss": "kto"}}, "dpo.online_rounds: 3: online rounds label pairs"),
        ({"dpo": {"online_rounds": 2}, "env": {"kind": "calculator"}}, "not episodes \\(env.kind is 'calculator'\\)"),
        ({"dpo": {"online_rounds": 2}, "trainer": {"strategy": "fsdp"}}, "run online rounds under ddp"),
        ({"dpo": {"online_rounds": 2, "online_k": 1}}, "dpo.online_k"),
    ],
)
def test_online_rounds_refuse_what_they_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(overrides)


def test_online_rounds_with_a_paired_loss_pass():
    assert _config({"dpo": {"online_rounds": 3, "loss": "ipo"}}).dpo.online_rounds == 3


def _config(overrides):
    raw = read_params(ROOT / "params.yaml")
    for section, values in overrides.items():
        raw[section].update(values)
    return load_config(raw)
