"""KTO's unpaired rows (`pipeline.data.unpaired`): the pairs made unpaired by the stated rule, the imbalance, the
mismatched responses of the KL estimate, and the collator's layout."""

import math

import pytest
import torch

from pipeline.data.batches import PreferencePair
from pipeline.data.unpaired import UnpairedCollator, as_kl_pairs, unpair, with_kl_reference


def _pairs(n: int, prompts: int) -> list[PreferencePair]:
    """n pairs over `prompts` prompts; chosen [10 + i], rejected [20 + i], reference log-probs -i and -10 - i."""
    return [
        PreferencePair(
            [i % prompts], [10 + i], [20 + i], index=i, reference_chosen_logps=-i, reference_rejected_logps=-10 - i
        )
        for i in range(n)
    ]


def test_each_pair_gives_a_desirable_and_an_undesirable_row_with_its_reference_log_probs():
    rows = unpair(_pairs(4, 2), desirable_fraction=1.0, seed=0)
    assert [(r.response_ids[0], r.desirable) for r in rows] == [
        (10, True), (20, False), (11, True), (21, False), (12, True), (22, False), (13, True), (23, False),
    ]  # fmt: skip
    assert [r.reference_logps for r in rows] == [0, -10, -1, -11, -2, -12, -3, -13]
    assert [r.index for r in rows] == list(range(8)) and all(math.isnan(r.reference_kl_logps) for r in rows)
    for row in rows:  # the KL estimate's response is another prompt's
        owner = next(r for r in rows if r.response_ids == row.kl_response_ids)
        assert owner.prompt_ids != row.prompt_ids


def test_a_desirable_fraction_keeps_that_share_of_chosen_responses_and_every_rejected_one():
    rows = unpair(_pairs(50, 7), desirable_fraction=0.1, seed=3)
    assert sum(r.desirable for r in rows) == 5 and sum(not r.desirable for r in rows) == 50
    assert rows == unpair(_pairs(50, 7), desirable_fraction=0.1, seed=3)  # the draw is the seed's
    assert {tuple(r.response_ids) for r in rows if r.desirable} != {
        tuple(r.response_ids) for r in unpair(_pairs(50, 7), desirable_fraction=0.1, seed=4) if r.desirable
    }


def test_pairs_that_all_share_one_prompt_leave_no_mismatched_pair():
    with pytest.raises(ValueError, match="dpo.loss kto: every row has the same prompt"):
        unpair(_pairs(3, 1), desirable_fraction=1.0, seed=0)


def test_the_collator_lays_responses_then_mismatched_responses_out_as_pairs():
    rows = with_kl_reference(unpair(_pairs(2, 2), 1.0, seed=0), [-1.5, -2.5, -3.5, -4.5])
    batch = UnpairedCollator(pad_id=0, eos_id=99)(rows)
    assert batch["input_ids"].shape == (8, 3) and batch["desirable"].tolist() == [True, False, True, False]
    assert batch["input_ids"][:4, 1].tolist() == [10, 20, 11, 21]  # prompt, response, EOS
    assert batch["input_ids"][4:, 1].tolist() == [r.kl_response_ids[0] for r in rows]
    torch.testing.assert_close(
        batch["reference_logps"], torch.tensor([0.0, -10.0, -1.0, -11.0, -1.5, -2.5, -3.5, -4.5])
    )
    assert [p.rejected_ids for p in as_kl_pairs(rows)] == [r.kl_response_ids for r in rows]  # scored as pairs


def _kto_cfg(tmp_path, rows, **overrides):
    import dataclasses
    import json

    from tests.defaults import default_section

    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = default_section("dpo", loss="kto", kto_dataset="json", kto_data_files=str(path), max_length=64)
    return dataclasses.replace(cfg, **overrides), str(path)


def _feedback(n: int) -> list[dict]:
    return [
        {"prompt": f"Review {i}:", "completion": f" good {i}" if i % 3 else " bad", "label": bool(i % 3)}
        for i in range(n)
    ]


def test_a_dataset_in_trls_unpaired_format_is_read_split_by_prompt_and_tokenised(tmp_path, tokenizer):
    from pipeline.train.dpo import kto_dataset_rows

    cfg, _ = _kto_cfg(tmp_path, _feedback(30), kto_val_fraction=0.2)
    splits = kto_dataset_rows(tokenizer, cfg, seed=0)
    assert (len(splits["train"]), len(splits["val"])) == (24, 6)
    train_prompts = {tuple(r.prompt_ids) for r in splits["train"]}
    assert not train_prompts & {tuple(r.prompt_ids) for r in splits["val"]}  # held out by prompt
    assert sum(r.desirable for r in splits["train"] + splits["val"]) == 20
    assert all(math.isnan(r.reference_logps) for r in splits["train"])  # in no cache: the stage scores them
    row = splits["train"][0]
    assert tokenizer.decode(row.response_ids) in {f" good {i}" for i in range(30)} | {" bad"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({5: {"label": 1}}, r"kto\.jsonl line 6 column 'label': 1 is not a boolean; TRL's unpaired format"),
        ({2: {"label": "true"}}, r"kto\.jsonl line 3 column 'label': \"true\" is not a boolean"),  # datasets: True
        ({7: {"completion": 3}}, r"kto\.jsonl row 7 column 'completion': 3 is neither text nor a list of turns"),
    ],
)
def test_a_bad_row_fails_naming_the_file_row_and_column(tmp_path, tokenizer, change, message):
    from pipeline.train.dpo import kto_dataset_rows

    rows = _feedback(12)
    for index, values in change.items():
        rows[index].update(values)
    cfg, _ = _kto_cfg(tmp_path, rows)
    with pytest.raises(ValueError, match=message):
        kto_dataset_rows(tokenizer, cfg, seed=0)


def test_feedback_with_one_label_only_fails_naming_the_column(tmp_path, tokenizer):
    from pipeline.train.dpo import kto_dataset_rows

    rows = [{**row, "label": False} for row in _feedback(12)]
    cfg, _ = _kto_cfg(tmp_path, rows)
    with pytest.raises(
        ValueError, match=r"kto\.jsonl column 'label': all 12 rows are False; KTO learns from desirable"
    ):
        kto_dataset_rows(tokenizer, cfg, seed=0)
    missing = [{"prompt": r["prompt"], "completion": r["completion"], "ok": r["label"]} for r in _feedback(12)]
    cfg, _ = _kto_cfg(tmp_path, missing)
    with pytest.raises(ValueError, match=r"dpo\.kto_dataset \(label\): column 'label' is not in dataset"):
        kto_dataset_rows(tokenizer, cfg, seed=0)
