import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.eval.frontier import (
    aggregate,
    frontier_markdown,
    frontier_points,
    pareto_mask,
    plot_frontier,
    seed_summary,
    seeds_markdown,
)
from pipeline.eval.policies import best_of_n_index, best_of_n_kl, distinct_n, mean_ci95, select, win_rate
from pipeline.models.generation import Samples
from pipeline.models.logprobs import sequence_kl


def test_win_rate_counts_ties_half():
    assert win_rate([0.5, 0.2, 0.1, 0.0], [0.1, 0.2, 0.3, 0.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_ci_of_a_known_sample():
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half == pytest.approx(1.96 * math.sqrt(2.5) / math.sqrt(5))


def test_best_of_n_kl_closed_form():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def test_best_of_n_picks_the_reward_models_argmax():
    rewards = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 1.0]])  # (P=2, N=3)
    assert best_of_n_index(rewards).tolist() == [1, 0]
    pool = Samples(
        [[1]] * 6, [[10], [11], [12], [20], [21], [22]], ["a", "b", "c", "d", "e", "f"], [True] * 6, [False] * 6
    )
    picked = select(pool, [p * 3 + int(k) for p, k in enumerate(best_of_n_index(rewards))])
    assert picked.texts == ["b", "d"] and picked.completion_ids == [[11], [20]]


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


class Unigram(torch.nn.Module):
    """A context-free LM: the same next-token distribution at every position."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.log(torch.tensor(probs)))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_sampled_sequence_kl_matches_the_exact_kl():
    p, q = [0.6, 0.3, 0.1], [0.2, 0.3, 0.5]
    exact = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    tokens = torch.multinomial(torch.tensor(p), 40_000, replacement=True, generator=torch.Generator().manual_seed(0))
    samples = Samples(
        [[0]] * len(tokens),
        [[int(t)] for t in tokens],
        [""] * len(tokens),
        [False] * len(tokens),
        [False] * len(tokens),
    )
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    kl = sequence_kl(Unigram(p), Unigram(q), samples, tokenizer, batch_size=4096)
    assert float(kl.mean()) == pytest.approx(exact, abs=0.02)
    assert float(sequence_kl(Unigram(p), Unigram(p), samples, tokenizer, 4096).abs().max()) < 1e-6


def _run(group, seed, beta, kl_coef, dpo, ppo, bon):
    metrics = {
        "sft/gold_score": 0.0,
        "sft/kl": 0.0,
        "dpo/kl": dpo[0],
        "dpo/gold_score": dpo[1],
        "ppo/kl": ppo[0],
        "ppo/gold_score": ppo[1],
        "bon/kl": bon[0],
        "bon/gold_score": bon[1],
    }
    params = {"seed": seed, "dpo.beta": beta, "ppo.kl_coef": kl_coef, "evaluate.best_of_n": 4}
    return {"run_group": group, "params": params, "metrics": metrics}


def test_frontier_pareto_selection_and_seed_averaging():
    runs = [
        _run("a", 1, 0.1, 0.05, dpo=(8.0, 0.90), ppo=(4.0, 0.80), bon=(0.6, 0.50)),
        _run("b", 2, 0.1, 0.05, dpo=(8.0, 0.80), ppo=(4.0, 0.80), bon=(0.6, 0.50)),  # seed 2 of the same config
        _run("c", 1, 0.5, 0.05, dpo=(3.0, 0.60), ppo=(4.0, 0.80), bon=(0.6, 0.50)),  # dominated by ppo (4.0, 0.8)?
    ]
    table = aggregate(frontier_points(runs))
    dpo = table[table["method"] == "dpo"].set_index("value")
    assert dpo.loc[0.1, "gold_score"] == pytest.approx(0.85) and dpo.loc[0.1, "seeds"] == 2
    assert dpo.loc[0.1, "gold_ci95"] == pytest.approx(1.96 * 0.0707107 / math.sqrt(2), rel=1e-4)
    assert dpo.loc[0.1, "runs"] == "a, b"
    pareto = {(r.method, r.value) for r in table.itertuples() if r.pareto}
    # dpo beta 0.5 (3.0, 0.6) is not dominated: lower KL than ppo; ppo (4.0, 0.8) and bon (0.6, 0.5) neither
    assert pareto == {("dpo", 0.1), ("dpo", 0.5), ("ppo", 0.05), ("best-of-n", 4.0)}


def test_pareto_mask_hand_set():
    kl = [1.0, 2.0, 2.0, 3.0, 0.5]
    gold = [0.5, 0.7, 0.6, 0.7, 0.1]
    # (2, 0.6) is dominated by (2, 0.7); (3, 0.7) by (2, 0.7)
    assert pareto_mask(kl, gold) == [True, True, False, False, True]


def test_length_controlled_win_rate_removes_wins_explained_by_length():
    from pipeline.eval.policies import length_controlled_win_rate

    # Equal lengths: nothing to control for, the LC win-rate is the raw one.
    scores, baseline = [1.0, 1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0, 0.5]
    assert length_controlled_win_rate(scores, baseline, [5] * 5, [5] * 5) == pytest.approx(0.7, abs=1e-3)
    # 2 tokens longer the policy wins 9 times in 10, 2 tokens shorter once in 10, and it is longer twice as often:
    # raw win-rate 19 / 30, but P(win) = sigmoid(1.0986 * gap) puts equal length at a coin flip.
    gaps = [2] * 20 + [-2] * 10
    wins = [1.0] * 18 + [0.0] * 2 + [1.0] + [0.0] * 9
    lc = length_controlled_win_rate(wins, [0.5] * 30, [10 + g for g in gaps], [10] * 30)
    assert win_rate(wins, [0.5] * 30) == pytest.approx(19 / 30) and lc == pytest.approx(0.5, abs=1e-3)
    # Ties everywhere (SFT against itself): 0.5.
    assert length_controlled_win_rate([0.2] * 4, [0.2] * 4, [3, 4, 5, 6], [3, 4, 5, 6]) == pytest.approx(0.5)


def _headline_run(group, seed, estimator, gold):
    metrics = {}
    for policy, value in (("sft", 0.0), ("ppo", gold), ("bon", 0.5), ("bon_2", 0.3)):
        metrics.update(
            {
                f"{policy}/gold_score": value,
                f"{policy}/kl": 2 * value,
                f"{policy}/win_rate": value,
                f"{policy}/lc_win_rate": value,
                f"{policy}/length": 10.0,
            }
        )
    params = {"seed": seed, "ppo.kl_coef": 0.05, "ppo.advantage_estimator": estimator, "evaluate.best_of_n": 8}
    return {"run_group": group, "params": params, "metrics": metrics}


def test_seed_summary_names_policies_and_averages_each_over_its_seeds():
    runs = [
        _headline_run("a", 1, "gae", 0.8),
        _headline_run("b", 2, "gae", 0.6),
        _headline_run("c", 3, "gae", 0.7),
        _headline_run("d", 1, "grpo", 0.9),
    ]
    table = seed_summary(runs).set_index("policy")
    assert list(table.index) == ["sft", "best-of-2", "best-of-8", "grpo kl_coef=0.05", "ppo kl_coef=0.05"]
    assert table.loc["ppo kl_coef=0.05", "gold_score"] == pytest.approx(0.7)
    assert table.loc["ppo kl_coef=0.05", "gold_score_ci95"] == pytest.approx(1.96 * 0.1 / math.sqrt(3))
    assert table.loc["ppo kl_coef=0.05", "kl"] == pytest.approx(1.4) and table.loc["ppo kl_coef=0.05", "seeds"] == 3
    # SFT and Best-of-N of seed 1 are shared by runs a and d: counted once per seed
    assert table.loc["sft", "seeds"] == 3 and table.loc["grpo kl_coef=0.05", "seeds"] == 1
    assert "| ppo kl_coef=0.05 | 3 | 0.700 ± 0.113 | 1.40 ± 0.23 |" in seeds_markdown(seed_summary(runs))


def test_a_point_whose_policy_tripped_a_gate_is_marked_with_the_seeds_it_tripped_in(tmp_path):
    runs = [
        _run("a", 1, 0.1, 0.05, dpo=(8.0, 0.90), ppo=(4.0, 0.80), bon=(0.6, 0.50)),
        _run("b", 2, 0.1, 0.05, dpo=(8.0, 0.80), ppo=(4.0, 0.80), bon=(0.6, 0.50)),
    ]
    runs[0]["tags"] = {"gates.tripped": "gold_drop@30"}  # ppo's training, seed 1
    runs[1]["tags"] = {"gates.evaluate": "dpo:max_kl, sft:max_kl"}  # on the test prompts, seed 2
    table = aggregate(frontier_points(runs)).set_index("method")
    assert (table.loc["ppo", "tripped"], table.loc["dpo", "tripped"], table.loc["best-of-n", "tripped"]) == (1, 1, 0)
    markdown = frontier_markdown(table.reset_index())
    assert "| ppo | ppo.kl_coef | 0.05 | 4.00 ± 0.00 | 0.800 ± 0.000 | 2 | **yes** | **1 of 2** |" in markdown
    plot_frontier(table.reset_index(), tmp_path / "frontier.png")  # the tripped points drawn as red crosses


def test_frontier_names_the_estimator_and_counts_a_shared_policy_once():
    runs = [_headline_run("a", 1, "gae", 0.8), _headline_run("d", 1, "rloo", 0.9)]
    for run in runs:
        run["metrics"].update({"dpo/kl": 1.0, "dpo/gold_score": 0.7})
        run["params"].update({"dpo.beta": 0.1, "dpo.loss": "simpo"})
    points = frontier_points(runs)
    assert sorted(points["method"]) == ["best-of-n", "best-of-n", "ppo", "rloo", "simpo"]


def test_kto_on_an_imbalance_is_its_own_point_beside_balanced_kto_at_the_same_beta():
    runs = []
    for group, seed, fraction in (("a", 1, 1.0), ("b", 1, 0.1), ("c", 2, 0.1)):
        run = _run(group, seed, 0.1, 0.05, dpo=(5.0, 0.8 if fraction == 1 else 0.6), ppo=(4.0, 0.8), bon=(0.6, 0.5))
        run["params"].update({"dpo.loss": "kto", "dpo.kto_desirable_fraction": fraction, "dpo.kto_lambda_d": 10})
        runs.append(run)
    table = aggregate(frontier_points(runs)).set_index("method")
    assert table.loc["kto", "gold_score"] == pytest.approx(0.8) and table.loc["kto", "seeds"] == 1
    assert table.loc["kto 1:10", "gold_score"] == pytest.approx(0.6) and table.loc["kto 1:10", "seeds"] == 2


def test_online_dpo_is_its_own_point_beside_offline_dpo_at_the_same_beta():
    runs = []
    for group, seed, rounds in (("a", 1, 0), ("b", 1, 3), ("c", 2, 3)):
        run = _run(group, seed, 0.1, 0.05, dpo=(5.0, 0.9 if rounds else 0.8), ppo=(4.0, 0.8), bon=(0.6, 0.5))
        run["params"].update({"dpo.loss": "sigmoid", "dpo.online_rounds": rounds})
        runs.append(run)
    table = aggregate(frontier_points(runs)).set_index("method")
    assert table.loc["dpo", "gold_score"] == pytest.approx(0.8) and table.loc["dpo", "seeds"] == 1
    assert table.loc["online dpo x3", "gold_score"] == pytest.approx(0.9) and table.loc["online dpo x3", "seeds"] == 2
