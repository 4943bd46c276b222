import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.schemas import PREFERENCE_PAIRS, DataContractError, validate_frame
from pipeline.eval.policies import spearman
from pipeline.tasks.preferences import (
    annotator_bias,
    dataset_pairs,
    expected_flip_rate,
    pairs_from_samples,
    preference_probability,
    screen_pairs,
    split_dialogues,
)
from pipeline.train.reward import bradley_terry_loss
from tests.defaults import default_section


def test_bradley_terry_loss_hand_values():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, -1.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(0) = log 2; -log sigmoid(3) = 0.048587
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor([0.313262, 0.693147, 0.048587]))
    # margin 1 shifts the logit: -log sigmoid(1 - 1) = log 2
    torch.testing.assert_close(bradley_terry_loss(chosen[:1], rejected[:1], margin=1.0), torch.tensor([0.693147]))
    # centering adds coef * (r_c + r_r)^2 = 0.5 * (2 - 1)^2 = 0.5
    torch.testing.assert_close(
        bradley_terry_loss(chosen[2:], rejected[2:], center_coef=0.5), torch.tensor([0.048587 + 0.5])
    )


def test_spearman_is_rank_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert math.isnan(spearman([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]))  # a constant side ranks nothing


def test_annotator_probability_and_tau_zero():
    p = preference_probability(np.array([0.1, -0.2, 0.0]), np.zeros(3), tau=0.1)
    np.testing.assert_allclose(p, [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2)), 0.5])
    np.testing.assert_array_equal(preference_probability(np.array([0.3, -0.3]), np.zeros(2), tau=0), [1.0, 0.0])


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.5])
def test_flip_rate_matches_closed_form_within_sampling_error(tau):
    rng = np.random.default_rng(0)
    n_prompts, k = 3000, 4
    golds = rng.uniform(-1, 1, size=(n_prompts, k)).round(3)
    responses = [[f"r{i}-{j}" for j in range(k)] for i in range(n_prompts)]
    table, stats = pairs_from_samples(
        [f"p{i}" for i in range(n_prompts)], responses, golds.tolist(), tau=tau, min_gold_gap=0.0, rng=rng
    )
    n = len(table)
    gaps = (table["chosen_gold"] - table["rejected_gold"]).to_numpy()
    expected = expected_flip_rate(gaps, tau)
    assert stats["flip_rate_expected"] == pytest.approx(expected)
    assert abs(stats["flip_rate"] - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_ties_are_dropped_and_tau_zero_follows_gold():
    table, stats = pairs_from_samples(
        ["p"], [["a", "b", "c"]], [[0.5, 0.5, -0.2]], tau=0.0, min_gold_gap=0.0, rng=np.random.default_rng(0)
    )
    assert stats["dropped_ties"] == 1 and stats["flip_rate"] == 0.0
    assert sorted(zip(table["chosen"], table["rejected"], strict=True)) == [("a", "c"), ("b", "c")]


def test_biased_annotator_prefers_the_pattern_over_gold():
    texts = ["Runs 90 minutes. It runs 95 minutes.", "Great acting.", "Runs 90 minutes."]
    assert annotator_bias(texts, r"minutes", 0.3) == [0.6, 0.0, 0.3]
    assert annotator_bias(texts, None, 0.3) == annotator_bias(texts, r"minutes", 0.0) == [0.0, 0.0, 0.0]
    # gold + bias: 0.0 + 0.6, 0.2 + 0.0, 0.0 + 0.3 -> both filler texts beat the gold-best one
    table, stats = pairs_from_samples(
        ["p"], [texts], [[0.0, 0.2, 0.0]], tau=0.0, min_gold_gap=0.0, rng=np.random.default_rng(0),
        biases=[annotator_bias(texts, r"minutes", 0.3)],
    )  # fmt: skip
    assert sorted(zip(table["chosen"], table["rejected"], strict=True)) == sorted(
        [(texts[0], texts[1]), (texts[0], texts[2]), (texts[2], texts[1])]
    )
    # the gold columns stay gold: the two labels against the gold order are the bias's flips
    assert stats["flip_rate"] == pytest.approx(2 / 3) and stats["flip_rate_expected"] == 0.0
    assert stats["gold_gap_mean"] == pytest.approx((0.2 + 0.0 + 0.2) / 3)
    # a tie in gold that the bias breaks is a pair, not a dropped tie; one the bias makes is dropped
    _, stats = pairs_from_samples(
        ["p"], [["a", "b"]], [[0.2, 0.5]], tau=0.0, min_gold_gap=0.0, rng=np.random.default_rng(0),
        biases=[[0.3, 0.0]],
    )  # fmt: skip
    assert stats["dropped_ties"] == 1 and stats["pairs"] == 0


def test_hh_dialogues_split_at_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: sure, here is one"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"
    frame = split_dialogues([chosen], [rejected], "hh")
    assert frame.loc[0, "prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
    assert (frame.loc[0, "chosen"], frame.loc[0, "rejected"]) == (" sure, here is one", " no")
    with pytest.raises(ValueError, match=r"hh: 1 row\(s\) are not two dialogues sharing .* \(rows 0\)"):
        split_dialogues(["\n\nHuman: a\n\nAssistant: b"], ["\n\nHuman: x\n\nAssistant: y"], "hh")


HELD_OUT = frozenset({"Held out:"})


def _bad_pairs(tokenizer):
    return pd.DataFrame(
        {
            "prompt": ["Review:", "Review:", "Review:", "Review:", "Review:", "Review:", "Review:", "Held out:"],
            "chosen": [
                " good.",
                " same",
                " ",
                "Review: again",
                f" one{tokenizer.eos_token}",
                " word" * 80,
                " good.",
                " fine.",
            ],
            "rejected": [" bad.", " same", " x", " fine", " two", " short", " bad.", " dull."],
            "chosen_gold": [0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 0.0],
            "rejected_gold": [-0.4, 0.0, 0.0, 0.0, 0.0, 0.0, -0.4, 0.0],
        }
    )


def test_screen_counts_and_drops_each_bad_row_type(tokenizer):
    kept, counts = screen_pairs(
        _bad_pairs(tokenizer), tokenizer, max_length=64, on_invalid="drop", source="s", held_out=HELD_OUT, dedupe=True
    )
    assert kept["chosen"].tolist() == [" good."]
    assert counts == {
        "invalid/identical": 1.0,
        "invalid/empty_response": 1.0,
        "invalid/repeats_prompt": 1.0,
        "invalid/extra_eos": 1.0,
        "invalid/too_long": 1.0,
        "invalid/held_out_prompt": 1.0,
        "invalid/duplicate": 1.0,
    }


def test_screen_fail_names_each_check_and_row(tokenizer):
    with pytest.raises(ValueError) as info:
        screen_pairs(
            _bad_pairs(tokenizer),
            tokenizer,
            max_length=64,
            on_invalid="fail",
            source="prefs train",
            held_out=HELD_OUT,
            dedupe=True,
        )
    message = str(info.value)
    assert message.startswith("prefs train: invalid preference pairs (max_length=64):")
    for line in (
        "identical: 1 row(s) (rows 1)",
        "empty_response: 1 row(s) (rows 2)",
        "repeats_prompt: 1 row(s) (rows 3)",
        "extra_eos: 1 row(s) (rows 4)",
        "too_long: 1 row(s) (rows 5)",
        "held_out_prompt: 1 row(s) (rows 7)",
        "duplicate: 1 row(s) (rows 6)",
    ):
        assert line in message
    assert "preferences.on_invalid: drop" in message


def test_pairs_schema_rejects_identical_and_empty():
    frame = pd.DataFrame(
        {
            "prompt": ["p", "p"],
            "chosen": [" a", ""],
            "rejected": [" a", " b"],
            "chosen_gold": [0.0, 0.0],
            "rejected_gold": [0.0, 0.0],
        }
    )
    with pytest.raises(DataContractError) as info:
        validate_frame(frame, PREFERENCE_PAIRS, "data/preferences/train.parquet")
    assert "chosen must differ from rejected: rows 0" in str(info.value)
    assert "column 'chosen' fails must be a non-empty string: rows 1" in str(info.value)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _prefs_cfg(**overrides):
    return default_section("preferences", mode="dataset", **overrides)


def test_hh_style_dataset_from_local_json(tmp_path, tokenizer):
    rows = [
        {
            "chosen": f"\n\nHuman: q{i}?\n\nAssistant: good answer {i}",
            "rejected": f"\n\nHuman: q{i}?\n\nAssistant: bad {i}",
        }
        for i in range(20)
    ]
    cfg = _prefs_cfg(dataset_path="json", data_files=_jsonl(tmp_path / "hh.jsonl", rows), val_fraction=0.25)
    splits = dataset_pairs(cfg, seed=0, tokenizer=tokenizer)
    assert (len(splits["train"]), len(splits["val"])) == (15, 5)
    assert set(splits["train"]["prompt"]).isdisjoint(splits["val"]["prompt"])
    first = splits["train"].iloc[0]
    assert first["prompt"].endswith("\n\nAssistant:") and first["chosen"].startswith(" good answer")
    assert splits["train"]["chosen_gold"].isna().all()


def test_prompt_column_dataset_and_missing_column(tmp_path, tokenizer):
    rows = [{"question": f"Q{i}", "good": f" yes {i}", "bad": f" no {i}"} for i in range(10)]
    files = _jsonl(tmp_path / "p.jsonl", rows)
    cfg = _prefs_cfg(
        dataset_path="json", data_files=files, prompt_column="question", chosen_column="good", rejected_column="bad"
    )
    splits = dataset_pairs(cfg, seed=0, tokenizer=tokenizer)
    assert len(splits["train"]) + len(splits["val"]) == 10
    with pytest.raises(ValueError, match=r"preferences\.chosen_column: column 'chosen' is not in dataset 'json'"):
        dataset_pairs(dataclasses.replace(cfg, chosen_column="chosen"), seed=0, tokenizer=tokenizer)
