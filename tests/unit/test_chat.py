"""Conversations and chat templates: the loss mask token by token, end-of-turn detection, plain rendering, errors."""

import dataclasses
import json

import pytest
import torch

from pipeline.data.batches import SFTCollator, tokenize_rows
from pipeline.data.chat import (
    conversation_rows,
    end_of_turn_token,
    hh_turns,
    parse_turns,
    render_prompt,
    split_last_assistant,
    use_chat_template,
)
from pipeline.data.tokenization import load_tokenizer
from pipeline.models.build import build_causal_lm
from pipeline.models.generation import SamplingParams, sample, stop_ids
from tests.standins import EOS, IM_END, QWEN_TOOLS, chat_llama, chat_tokenizer


def conversation_prompts(values, tokenizer, where):
    rows = conversation_rows(values, tokenizer, where)
    return [row["prompt"] for row in rows], [row["completion"] for row in rows]


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Your review?"},
    {"role": "assistant", "content": "A great film."},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return chat_llama(tmp_path_factory.mktemp("hub") / "chat-llama")


@pytest.fixture
def chat_tok(chat_dir):
    return use_chat_template(load_tokenizer(chat_dir), "auto")


def test_template_end_of_turn_becomes_eos_and_pad_stays_distinct(chat_tok):
    assert end_of_turn_token(chat_tok) == IM_END
    assert chat_tok.eos_token == IM_END
    assert chat_tok.pad_token_id not in (chat_tok.eos_token_id, chat_tok.convert_tokens_to_ids(EOS))


def test_sft_mask_covers_exactly_the_final_assistant_turn(chat_tok):
    prompts, completions = conversation_prompts([CONVERSATION], chat_tok, "chat.jsonl column 'messages'")
    assert prompts[0].endswith("<|im_start|>assistant\n") and "Hello there<|im_end|>" in prompts[0]
    rows = tokenize_rows(chat_tok, prompts, completions, 128, "test")
    batch = SFTCollator(chat_tok.pad_token_id, chat_tok.eos_token_id)(rows)
    ids, mask = batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist()
    # The trained sequence is the template's own rendering of the whole conversation, up to the last end-of-turn.
    full = chat_tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert chat_tok.decode(ids) == full[: full.rindex(IM_END) + len(IM_END)]
    # Token by token: targets are the final answer's tokens and its <|im_end|>, nothing of the earlier turns.
    expected = chat_tok.convert_ids_to_tokens(chat_tok("A great film.", add_special_tokens=False)["input_ids"])
    assert [t for t, m in zip(chat_tok.convert_ids_to_tokens(ids), mask, strict=True) if m] == [*expected, IM_END]
    assert mask == [0] * (len(ids) - len(expected) - 1) + [1] * (len(expected) + 1)


def test_template_choices_none_and_file(chat_dir, tmp_path):
    plain = use_chat_template(load_tokenizer(chat_dir), "none")
    assert plain.chat_template is None and plain.eos_token == EOS
    assert render_prompt(plain, CONVERSATION[:2]) == "\n\nSystem: Answer briefly.\n\nHuman: Hi\n\nAssistant:"
    assert render_prompt(plain, "Just text") == "Just text"
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    custom = use_chat_template(load_tokenizer(chat_dir), str(template))
    assert render_prompt(custom, "Hi") == "<|im_start|>Hi<|im_end|><|im_start|>"
    with pytest.raises(FileNotFoundError, match=r"model\.chat_template: 'nope\.jinja' is not a file"):
        use_chat_template(load_tokenizer(chat_dir), "nope.jinja")


def test_template_without_special_end_of_turn_is_refused(chat_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match=r"model\.chat_template: the template ends an assistant turn with '\\n'"):
        use_chat_template(load_tokenizer(chat_dir), str(template))


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"content": "hi"}, {"role": "assistant", "content": "a"}],
         r"f\.jsonl row 3 column 'messages': turn 0 has no 'role'"),
        ([{"role": "robot", "content": "hi"}], r"turn 0 has unknown role 'robot'; roles are system, user, assistant"),
        ([{"role": "user", "content": None}], r"turn 0 has no 'content'"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "calc", "arguments": "{x"}}]}],
         r"turn 0 tool_calls call 0: arguments '\{x' are not JSON"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
         r"turn 0 tool_calls call 0 is .*; a call needs a function 'name' and 'arguments'"),
        ([{"role": "user", "content": "hi"}], r"row 3 column 'messages': the conversation has no assistant turn"),
        ([{"role": "user", "content": 3}], r"turn 0 content is 3, not a string or a list of content parts"),
        ("just text", r"expected a non-empty list of \{role, content\} turns"),
    ],
)  # fmt: skip
def test_bad_turns_name_file_row_and_column(turns, message):
    with pytest.raises(ValueError, match=message):
        split_last_assistant(parse_turns(turns, "f.jsonl row 3 column 'messages'"), "f.jsonl row 3 column 'messages'")


def test_hh_dialogue_reads_as_turns_and_renders_back_without_template():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: sure"
    turns = hh_turns(text, "hh")
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    plain = chat_tokenizer()
    plain.chat_template = None
    prompts, completions = conversation_prompts([text], plain, "hh")
    assert prompts[0] + completions[0] == text
    with pytest.raises(ValueError, match=r"hh row 0: not an HH dialogue"):
        conversation_prompts(["no turns here"], plain, "hh")


def test_generation_stops_at_every_end_of_turn_token(chat_dir, chat_tok, model_cfg):
    model = build_causal_lm(dataclasses.replace(model_cfg, base=chat_dir), chat_tok)
    im_end, eos = chat_tok.convert_tokens_to_ids(IM_END), chat_tok.convert_tokens_to_ids(EOS)
    assert stop_ids(model, chat_tok) == [im_end, eos]  # the end-of-turn first: it is what collators append
    with torch.no_grad():
        model.model.norm.weight.zero_()  # uniform next-token distribution: every token, stops included, is likely
    params = SamplingParams(max_new_tokens=200, temperature=1.0, top_k=0, top_p=1.0)
    prompts = ["Hi"] * 48
    listed = sample(model, chat_tok, prompts, params, batch_size=48, seed=3)
    model.generation_config.eos_token_id = im_end  # the same draws, stopping at <|im_end|> only
    single = sample(model, chat_tok, prompts, params, batch_size=48, seed=3)
    by_stop = {im_end: 0, eos: 0}
    for tokens, ended, full in zip(listed.completion_ids, listed.ended, single.completion_ids, strict=True):
        assert im_end not in tokens and eos not in tokens
        if ended:  # (a sampled pad is dropped from rows that never ended: compare without pads)
            tokens, full = ([t for t in row if t != chat_tok.pad_token_id] for row in (tokens, full))
            stop = ([*full, im_end])[len(tokens)]  # where the single-stop run went on, or ended
            assert full[: len(tokens)] == tokens and stop in by_stop
            by_stop[stop] += 1
    assert 0 < sum(listed.ended) < len(prompts)
    assert by_stop[im_end] > 0 and by_stop[eos] > 0  # both ends were met and both counted as "ended"


def test_openai_content_parts_are_read_as_their_joined_text():
    parts = [{"type": "text", "text": "Rate this film."}, {"type": "text", "text": "Be brief."}]
    turns = parse_turns(
        [{"role": "user", "content": parts}, {"role": "assistant", "content": "Fine."}], "f.jsonl row 0"
    )
    assert turns[0] == {"role": "user", "content": "Rate this film.\nBe brief."}
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    with pytest.raises(ValueError, match=r"f\.jsonl row 0: turn 0 content part 1 is \{'type': 'image_url'.*only text"):
        parse_turns([{"role": "user", "content": image}], "f.jsonl row 0")


TOOL_CONVERSATION = [
    {"role": "user", "content": "Ann has 12 coins, Bo has 31 coins. How many coins in all?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": '{"expression": "12+31"}'}}],
    },
    {"role": "tool", "content": "43"},
    {"role": "assistant", "content": "43"},
]
SCHEMA = '[{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]'


def test_a_conversation_with_tool_calls_trains_every_assistant_turn_and_never_a_tools_result():
    """Hub chat data in OpenAI's format (`tool_calls` with JSON-string arguments, a `tool` turn, a `tools` column):
    one row per assistant turn; the template's own text for the call; the tool's result only ever in a prompt."""
    tokenizer = use_chat_template(chat_tokenizer(template=QWEN_TOOLS), "auto")
    rows = conversation_rows(
        [TOOL_CONVERSATION, CONVERSATION], tokenizer, "tools.jsonl column 'messages'", [SCHEMA, None]
    )
    assert [(r["turn"], r["conversation"]) for r in rows] == [(0, 0), (1, 0), (0, 1)]
    call, answer = rows[0], rows[1]
    assert call["prompt"].startswith("<|im_start|>system\nYou may call these tools:")  # the row's tools, offered
    assert call["completion"] == '<tool_call>\n{"name": "calc", "arguments": {"expression": "12+31"}}\n</tool_call>'
    assert answer["completion"] == "43" and "<tool_response>\n43\n</tool_response>" in answer["prompt"]
    # the second row's prompt is the first row's prompt, its call and end-of-turn, and the tool turn: as rollouts
    # build it, and as the template renders the whole conversation
    assert answer["prompt"].startswith(call["prompt"] + call["completion"] + IM_END)
    tools = json.loads(SCHEMA)  # the template renders the arguments read as an object, as real ones expect them
    whole = tokenizer.apply_chat_template(parse_turns(TOOL_CONVERSATION, "t"), tools=tools, tokenize=False)
    assert answer["prompt"] + answer["completion"] + IM_END + "\n" == whole
    batch = SFTCollator(0, tokenizer.eos_token_id)(
        tokenize_rows(tokenizer, [answer["prompt"]], [answer["completion"]], 400, "test")
    )
    trained = [i for i, m in zip(batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist(), strict=True) if m]
    assert tokenizer.decode(trained) == "43" + IM_END  # the answer alone: nothing of the tool's turn
    plain = chat_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"t row 0: the conversation has tool calls or tool turns, which only a chat"):
        conversation_rows([TOOL_CONVERSATION], plain, "t")
    with pytest.raises(ValueError, match=r"t row 0 column 'tools': '\[\{' is not JSON"):
        conversation_rows([TOOL_CONVERSATION], tokenizer, "t", ["[{"])
