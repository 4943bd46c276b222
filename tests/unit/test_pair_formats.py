"""Preference datasets in every accepted format, read from local JSON lines through `datasets`, and their errors."""

import json

import pandas as pd
import pytest

from pipeline.data.chat import use_chat_template
from pipeline.envs.tools import CALC
from pipeline.models.judges import VaderJudge
from pipeline.tasks.preferences import dataset_pairs
from pipeline.tasks.prepare import prepare_splits
from tests.defaults import default_section
from tests.standins import QWEN_TOOLS, chat_tokenizer, hh_rows, ultrafeedback_rows, write_jsonl
from tests.unit.test_synthetic import _cfg

USER = {"role": "user", "content": "Rate the film."}


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = chat_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return use_chat_template(tokenizer, "auto")


def _cfg_for(path, **overrides):
    values = {"mode": "dataset", "dataset_path": "json", "data_files": str(path), "val_fraction": 0.25, **overrides}
    return default_section("preferences", **values)


def test_trl_implicit_prompt_conversations_render_with_the_template(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows(12))
    splits = dataset_pairs(_cfg_for(path), seed=0, tokenizer=chat_tok)
    rows = splits["train"]
    assert (len(rows), len(splits["val"])) == (9, 3)
    assert rows["prompt"].str.startswith("<|im_start|>user\nWrite about this:").all()
    assert rows["prompt"].str.endswith("<|im_start|>assistant\n").all()
    assert not rows["chosen"].str.contains("<|im_", regex=False).any()  # the end-of-turn is the collator's EOS


def test_trl_explicit_prompt_with_multi_turn_chosen(tmp_path, chat_tok):
    rows = [
        {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": f"Great {i}."}],
            "rejected": [{"role": "assistant", "content": f"Dull {i}."}],
        }
        for i in range(4)
    ]
    rows.append(
        {
            "prompt": [USER],
            "chosen": [
                {"role": "assistant", "content": "Well,"},
                {"role": "user", "content": "go on"},
                {"role": "assistant", "content": "Yes."},
            ],
            "rejected": [
                {"role": "assistant", "content": "Well,"},
                {"role": "user", "content": "go on"},
                {"role": "assistant", "content": "No."},
            ],
        }
    )
    splits = dataset_pairs(
        _cfg_for(write_jsonl(tmp_path / "p.jsonl", rows), prompt_column="prompt"), seed=0, tokenizer=chat_tok
    )
    frame = pd.concat([splits["train"], splits["val"]])
    single = "<|im_start|>user\nRate the film.<|im_end|>\n<|im_start|>assistant\n"
    assert set(frame["prompt"]) == {
        single,
        single + "Well,<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n",
    }  # earlier turns of chosen join the prompt
    assert sorted(frame["chosen"])[:2] == ["Great 0.", "Great 1."]


def test_hh_dialogues_render_with_a_template_and_stay_text_without(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rows(8))
    templated = dataset_pairs(_cfg_for(path, prompt_column=None), seed=0, tokenizer=chat_tok)["train"]
    assert templated["prompt"].str.contains("<|im_start|>user\nAnd then?<|im_end|>", regex=False).all()
    plain_tok = chat_tokenizer()
    plain_tok.chat_template = None
    plain = dataset_pairs(_cfg_for(path, prompt_column=None), seed=0, tokenizer=plain_tok)["train"]
    assert plain["prompt"].str.endswith("\n\nHuman: And then?\n\nAssistant:").all()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": [USER, {"role": "assistant", "content": "a"}], "rejected": "text"},
         r"column 'rejected': holds text but row 0 holds a list of turns; a dataset must use one format"),
        ({"chosen": [{"content": "hi"}, {"role": "assistant", "content": "a"}],
          "rejected": [USER, {"role": "assistant", "content": "b"}]},
         r"p\.jsonl row 1 column 'chosen': turn 0 has no 'role'"),
        ({"chosen": [USER, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
         r"p\.jsonl row 1 column 'chosen': the turns before the last assistant turn differ from .*row 1 column "
         r"'rejected'"),
        ({"chosen": [USER, {"role": "assistant", "content": "a"}], "rejected": None},
         r"p\.jsonl row 1 column 'rejected': None is neither text nor a list of turns"),
        ({"chosen": [USER, USER], "rejected": [USER, {"role": "assistant", "content": "b"}]},
         r"row 1 column 'chosen': the conversation has no assistant turn"),
    ],
)  # fmt: skip
def test_bad_pair_rows_name_file_row_and_column(tmp_path, chat_tok, row, message):
    good = {
        "chosen": [USER, {"role": "assistant", "content": "a"}],
        "rejected": [USER, {"role": "assistant", "content": "b"}],
    }
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [good, row])
    with pytest.raises(ValueError, match=message):
        dataset_pairs(_cfg_for(path, val_fraction=0.5), seed=0, tokenizer=chat_tok)


def _messages_cfg(data_files: str):
    """prepare's section for conversations in a `messages` column of local JSON lines, 4 held out each way."""
    return _cfg(
        source="dataset", dataset_path="json", data_files=data_files, n_val=4, n_test=4, messages_column="messages"
    )


def test_prepare_messages_column_renders_prompts_and_names_bad_rows(tmp_path, chat_tok):
    rows = [{"messages": r["chosen"]} for r in ultrafeedback_rows(20)]
    cfg = _messages_cfg(write_jsonl(tmp_path / "sft.jsonl", rows))
    splits = prepare_splits(cfg, seed=0, judge=VaderJudge(), tokenizer=chat_tok)
    assert splits["train"]["prompt"].str.startswith("<|im_start|>user\n").all()
    assert splits["test"]["completion"].tolist()[0] in {r["messages"][1]["content"] for r in rows}
    rows[7] = {"messages": [{"role": "user", "content": "hi"}]}
    write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match=r"sft\.jsonl column 'messages' row 7: the conversation has no assistant"):
        prepare_splits(cfg, seed=0, judge=VaderJudge(), tokenizer=chat_tok)


def test_prepare_reads_tool_conversations_a_row_per_assistant_turn_each_conversation_in_one_split(tmp_path):
    """Hub chat data with tool calls (OpenAI's `tool_calls`, `tool` turns, a `tools` column) written as JSON lines
    and read through `datasets`: every assistant turn a row, numbered by `turn`; a conversation's rows in one split;
    test keeps first turns, where episodes start; validation keeps every turn, as train."""
    tokenizer = chat_tokenizer(template=QWEN_TOOLS)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer = use_chat_template(tokenizer, "auto")
    schema = json.dumps([CALC.schema()])
    rows = []
    for i in range(30):
        arguments = json.dumps({"expression": f"{i}+7"})
        call = {"type": "function", "function": {"name": "calc", "arguments": arguments}}
        messages = [
            {"role": "user", "content": f"Problem {i}: {i} and 7?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": str(i + 7)},
            {"role": "assistant", "content": f"{i + 7}"},
        ]
        rows.append({"messages": messages, "tools": schema})
    cfg = _messages_cfg(write_jsonl(tmp_path / "tools.jsonl", rows))
    splits = prepare_splits(cfg, seed=0, judge=VaderJudge(), tokenizer=tokenizer)
    train = splits["train"]
    assert sorted(train["turn"].value_counts().to_dict().items()) == [(0, 22), (1, 22)]
    assert set(splits["test"]["turn"]) == {0} and len(splits["test"]) == 4 and len(splits["val"]) == 8  # every turn
    problem = r"Problem (\d+):"
    for name in ("val", "test"):  # no held-out problem has a turn in train
        assert not set(splits[name]["prompt"].str.extract(problem)[0]) & set(train["prompt"].str.extract(problem)[0])
    assert train[train["turn"] == 0]["completion"].str.startswith("<tool_call>\n").all()
    assert not train["completion"].str.contains("tool_response").any()
