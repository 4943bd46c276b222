"""The bad-input table: each bad file or row stops `prepare`/`sft` with the file, line or row, column and fix."""

import json

import pytest

from pipeline.data.batches import tokenize_rows
from pipeline.models.judges import VaderJudge
from pipeline.tasks.prepare import prepare_splits
from tests.unit.test_synthetic import _cfg

GOOD = [{"prompt": f"Q{i} is", "completion": f" answer {i}."} for i in range(30)]


def _prepare(tmp_path, text: bytes | str):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    cfg = _cfg(source="dataset", dataset_path="json", data_files=str(path), n_val=2, n_test=2)
    return prepare_splits(cfg, seed=0, judge=VaderJudge())


def _lines(rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_malformed_json_line_names_file_and_line(tmp_path):
    text = _lines(GOOD[:3]) + '{"prompt": "cut off", "completion\n' + _lines(GOOD[3:])
    with pytest.raises(
        ValueError,
        match=r"rows\.jsonl line 4: not valid JSON \(Unterminated string .*\); fix or "
        r"remove the line",
    ):
        _prepare(tmp_path, text)


def test_empty_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"rows\.jsonl: the file is empty; it needs one JSON object per line"):
        _prepare(tmp_path, "\n")


def test_non_utf8_bytes_name_the_line_and_the_fix(tmp_path):
    text = _lines(GOOD[:2]).encode() + '{"prompt": "caf\u00e9", "completion": " ok"}\n'.encode("latin-1")
    with pytest.raises(ValueError, match=r"rows\.jsonl line 3: bytes b'\\xe9' \(byte \d+\) are not UTF-8; re-encode"):
        _prepare(tmp_path, text + _lines(GOOD[2:]).encode())


@pytest.mark.parametrize(("value", "shown"), [(None, "(None|nan)"), (3.5, "3.5")])
def test_null_or_non_string_text_names_row_and_column(tmp_path, value, shown):
    rows = [dict(r) for r in GOOD]
    rows[4]["completion"] = value
    with pytest.raises(
        ValueError,
        match=rf"rows\.jsonl column 'completion' \(prepare\.completion_column\): 1 "
        rf"cell\(s\) are not text: row 4 \({shown}\); fill or drop",
    ):
        _prepare(tmp_path, _lines(rows))


def test_missing_data_file_is_named(tmp_path):
    cfg = _cfg(source="dataset", dataset_path="json", data_files=str(tmp_path / "nope.jsonl"), n_val=2, n_test=2)
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such data file"):
        prepare_splits(cfg, seed=0, judge=VaderJudge())


def test_over_long_sft_rows_fail_by_default_and_are_dropped_on_request(tokenizer):
    prompts, completions = ["The film"] * 3, [" was good.", " word" * 80, " was bad."]
    with pytest.raises(
        ValueError,
        match=r"train\.parquet: 1 row\(s\) exceed max_length=32 tokens \(rows 1\); .* or "
        r"set sft\.on_invalid: drop",
    ):
        tokenize_rows(tokenizer, prompts, completions, 32, "train.parquet")
    kept = tokenize_rows(tokenizer, prompts, completions, 32, "train.parquet", on_invalid="drop")
    assert len(kept) == 2


@pytest.mark.parametrize(
    ("row", "kind"), [('["Q is", " a."]', "array"), ('"Q is a."', "string"), ("42", "number"), ("null", "null")]
)
def test_a_json_line_that_is_not_an_object_is_named_by_its_line(tmp_path, row, kind):
    text = _lines(GOOD[:3]) + row + "\n" + _lines(GOOD[3:])
    with pytest.raises(ValueError, match=rf"rows\.jsonl line 4: .* is a JSON {kind}, not an object; each row is one"):
        _prepare(tmp_path, text)


def test_an_array_file_names_the_element_that_is_not_an_object(tmp_path):
    text = json.dumps([*GOOD[:5], ["not", "a row"], *GOOD[5:]])
    with pytest.raises(ValueError, match=r"rows\.jsonl element 5 of its array: \[\"not\", \"a row\"\] is a JSON array"):
        _prepare(tmp_path, text)
