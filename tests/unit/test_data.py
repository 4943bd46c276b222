import dataclasses
import json

import pandas as pd
import pytest

from pipeline.data.schemas import PROMPT_COMPLETION, DataContractError, validate_frame
from pipeline.models.judges import VaderJudge
from pipeline.tasks.prepare import prepare_splits
from tests.unit.test_synthetic import _cfg


def _write_json(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_local_json_with_column_mapping(tmp_path):
    rows = [{"question": f"Q{i} is", "answer": f" answer {i}."} for i in range(40)]
    files = _write_json(tmp_path / "rows.jsonl", rows)
    cfg = _cfg(
        source="dataset",
        dataset_path="json",
        data_files=files,
        n_train=100,
        n_val=5,
        n_test=5,
        prompt_column="question",
        completion_column="answer",
    )
    splits = prepare_splits(cfg, seed=0, judge=VaderJudge())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (30, 5, 5)
    assert set(splits["train"]["prompt"]).isdisjoint(splits["test"]["prompt"])
    assert splits["train"]["completion"].str.startswith(" answer").all()


def test_text_only_dataset_is_split_after_prompt_words(tmp_path):
    rows = [{"text": f"w{i} a b c d e f g h i j great ending"} for i in range(20)]
    cfg = _cfg(
        source="dataset",
        dataset_path="json",
        data_files=_write_json(tmp_path / "t.jsonl", rows),
        n_val=2,
        n_test=2,
        prompt_column="text",
        completion_column=None,
        prompt_words=3,
    )
    train = prepare_splits(cfg, seed=0, judge=VaderJudge())["train"]
    first = train.iloc[0]
    assert len(first["prompt"].split()) == 3
    assert first["completion"].startswith(" c d e")
    assert train["gold"].gt(0).all()  # "great" is read by the gold judge
    capped = prepare_splits(dataclasses.replace(cfg, completion_words=2), seed=0, judge=VaderJudge())["train"]
    assert (capped["completion"].str.split().str.len() == 2).all() and capped.iloc[0]["completion"] == " c d"


def test_missing_column_names_the_key_and_the_columns(tmp_path):
    files = _write_json(tmp_path / "rows.jsonl", [{"q": "a", "a": "b"}] * 5)
    cfg = _cfg(source="dataset", dataset_path="json", data_files=files, prompt_column="prompt")
    with pytest.raises(
        ValueError,
        match=r"prepare\.prompt_column: column 'prompt' is not in dataset 'json'; "
        r"its columns are q, a",
    ):
        prepare_splits(cfg, seed=0, judge=VaderJudge())


def test_schema_names_file_column_check_and_rows():
    frame = pd.DataFrame(
        {
            "prompt": ["ok", "", "fine", "  "],
            "completion": ["a", "b", None, "d"],
            "gold": [0.1, 0.0, 0.2, 0.3],
        }
    )
    with pytest.raises(DataContractError) as info:
        validate_frame(frame, PROMPT_COMPLETION, "data/prepared/train.parquet")
    message = str(info.value)
    assert message.startswith("data/prepared/train.parquet:")
    assert "column 'prompt' fails must be a non-empty string: rows 1" in message
    assert "column 'prompt' fails must not be blank: rows 1, 3" in message
    assert "column 'completion' fails not_nullable: rows 2" in message


def test_schema_rejects_unknown_columns():
    frame = pd.DataFrame({"prompt": ["a"], "completion": ["b"], "gold": [0.0], "extra": [1]})
    with pytest.raises(DataContractError, match="extra"):
        validate_frame(frame, PROMPT_COMPLETION, "x.parquet")
