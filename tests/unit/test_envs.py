"""The embedded environments, both dialogues (the tag protocol; a chat template's tool calls) step by step, and
`env.kind`'s loader."""

import json
import random

import pytest

from pipeline.data.chat import use_chat_template
from pipeline.envs.base import Step
from pipeline.envs.calculator import Calculator
from pipeline.envs.dialogue import ChatTemplate, PlainTags, dialogue_for
from pipeline.envs.guess import CEILING, GUESSES, Guess
from pipeline.envs.registry import environment_factory
from pipeline.envs.tools import CALC, Tool, ToolAnswer, calculate
from pipeline.tasks.tools import calculator_problem, calculator_splits
from tests.standins import CHATML, QWEN_TOOLS, chat_tokenizer


@pytest.fixture(scope="module")
def qwen():
    """A tokenizer with a Qwen2.5-shaped template (tools, `<tool_call>`, `tool` turns), resolved as stages do."""
    return use_chat_template(chat_tokenizer(template=QWEN_TOOLS), "auto")


def test_calculate_evaluates_integer_arithmetic_and_refuses_anything_else():
    assert calculate("12+31+7") == "50" and calculate("(2+3)*4-1") == "19" and calculate("-5+2") == "-3"
    for bad, reason in [
        ("__import__('os')", "unsupported"),
        ("2**8", "unsupported"),
        ("1.5+1", "unsupported"),
        ("12+", "cannot parse"),
        ("1+" * 150 + "1", "longer than 200"),
    ]:
        with pytest.raises(ValueError, match=reason):
            calculate(bad)


def _broken(argument: str) -> str:
    raise RuntimeError("disk on fire")


TOOLS = {"calc": CALC, "lookup": Tool("lookup", "Look a word up.", "word", _broken)}


def test_each_malformed_tag_call_comes_back_as_an_error_observation():
    tags = PlainTags()
    assert tags.answer_call("<calc>12+7</calc>", TOOLS).observation == "<result> 19</result>"
    assert tags.answer_call("the answer is 19", TOOLS) is None  # no call: the environment reads it as an answer
    for action, reason in [
        ("12+7</calc>", "</calc> without <calc>"),  # bad tag
        ("<calc> </calc>", "empty <calc> call"),
        ("<calc>12 plus 7</calc>", "calc: cannot parse '12 plus 7'"),  # arguments the tool refuses
        ("<lookup>x</lookup>", "lookup: disk on fire"),  # a tool that raises
    ]:
        answer = tags.answer_call(action, TOOLS)
        assert answer.error == reason and answer.observation == f"<result> error: {reason}</result>", action


def test_each_malformed_chat_template_call_comes_back_as_an_error_tool_turn(qwen):
    chat = ChatTemplate(qwen)
    turn = "\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "12+7"}}\n</tool_call>'
    assert chat.answer_call(call, TOOLS) == ToolAnswer(turn.format("19"))
    as_string = '<tool_call>{"name": "calc", "arguments": "{\\"expression\\": \\"2*3\\"}"}</tool_call>'
    assert chat.answer_call(as_string, TOOLS).observation == turn.format("6")  # arguments as a JSON string (OpenAI)
    assert chat.answer_call("It is 19.", TOOLS) is None
    assert chat.answer_call(call, {}) is None  # no tools: a call is read as the answer
    for action, reason in [
        ('<tool_call>{"name": "calc", "arguments": {"expression": "1+1"}', "<tool_call> and </tool_call> do not"),
        ('</tool_call>{"name": "calc"}<tool_call>', "<tool_call> and </tool_call> do not enclose a call"),
        ("<tool_call>{name: calc}</tool_call>", "the call is not JSON (Expecting property name enclosed in"),
        ('<tool_call>["calc"]</tool_call>', 'the call is not an object with a "name"'),
        ('<tool_call>{"name": "sqrt", "arguments": {}}</tool_call>', "unknown tool 'sqrt'; the tools are calc, lookup"),
        ('<tool_call>{"name": "calc", "arguments": {"x": "1"}}</tool_call>', 'calc takes "arguments": {"expression"'),
        ('<tool_call>{"name": "calc", "arguments": {"expression": "1/2"}}</tool_call>', "calc: unsupported '1 / 2'"),
        ('<tool_call>{"name": "lookup", "arguments": {"word": "x"}}</tool_call>', "lookup: disk on fire"),
    ]:
        answer = chat.answer_call(action, TOOLS)
        assert answer.error.startswith(reason), (action, answer.error)
        assert answer.observation == turn.format(f"error: {answer.error}"), action


def test_a_chat_templates_answer_is_appended_as_the_template_renders_the_whole_conversation(qwen):
    """Token-in, token-out: the first observation, the policy's call ended by its end-of-turn token and the tool turn
    appended after it are, as text, exactly the template's rendering of the conversation with that tool call."""
    chat = ChatTemplate(qwen)
    assert dialogue_for(qwen).__class__ is ChatTemplate and dialogue_for(None).__class__ is PlainTags
    history, call = chat.first("Q: 12 and 7?", [CALC]), chat.call(CALC, "12+7")
    history += chat.closed(call, [CALC]) + chat.answer_call(call, TOOLS).observation
    history += chat.closed("19", [CALC]) + chat.said(" lower.")
    function = {"name": "calc", "arguments": {"expression": "12+7"}}
    conversation = [
        {"role": "user", "content": "Q: 12 and 7?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": function}]},
        {"role": "tool", "content": "19"},
        {"role": "assistant", "content": "19"},
        {"role": "user", "content": "lower."},
    ]
    rendered = qwen.apply_chat_template(conversation, tools=[CALC.schema()], tokenize=False, add_generation_prompt=True)
    assert history == rendered
    assert json.loads(chat.call(CALC, "1+2").split("\n")[1]) == {"name": "calc", "arguments": {"expression": "1+2"}}
    assert chat.stop_texts([CALC]) == () and PlainTags().stop_texts([CALC]) == ("</calc>",)


def test_a_template_that_rewrites_the_history_when_a_turn_is_added_is_refused():
    # as templates that strip the reasoning of earlier assistant turns do: an assistant turn renders differently
    # once a turn follows it
    earlier = "(('(earlier) ' if message['role'] == 'assistant' and not loop.last else '') + message['content'])"
    rewrites = CHATML.replace("message['content']", earlier)
    tokenizer = use_chat_template(chat_tokenizer(template=rewrites), "auto")
    with pytest.raises(ValueError, match="model.chat_template: adding a 'tool' turn after an assistant turn does not"):
        ChatTemplate(tokenizer).answer_call('<tool_call>{"name": "calc"}</tool_call>', TOOLS)


def test_a_template_without_a_tool_role_is_named_when_a_tool_answers_and_single_turn_never_asks():
    from pipeline.methods.environments import episode_spec
    from tests.defaults import default_section

    strict = "{% if messages[-1]['role'] == 'tool' %}{{ raise_exception('Only user and assistant roles') }}{% endif %}"
    tokenizer = use_chat_template(chat_tokenizer(template=strict + CHATML), "auto")
    assert episode_spec(default_section("env", kind="none"), tokenizer) is None  # env.kind none builds no dialogue
    env = episode_spec(default_section("env", kind="calculator"), tokenizer).make_env()
    assert env.step("It is 19.").done  # an answer needs no tool turn
    with pytest.raises(ValueError, match=r"model.chat_template: the template cannot render a 'tool' turn after an"):
        env.step('<tool_call>{"name": "calc", "arguments": {"expression": "1"}}</tool_call>')


def test_a_chat_models_demonstrations_are_written_in_its_template(qwen):
    train = calculator_splits(40, 2, 2, 0.0, seed=0, dialogue=ChatTemplate(qwen))["train"]
    second = train[train["turn"] == 1].iloc[0]
    assert second["prompt"].startswith("<|im_start|>system\nYou may call these tools:")
    assert "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n" in second["prompt"]
    assert second["prompt"].endswith("<|im_start|>assistant\n") and second["completion"] == second["answer"]
    assert train[train["turn"] == 0]["completion"].str.startswith("<tool_call>\n").all()


def test_the_calculator_answers_a_call_and_scores_the_final_answer(qwen):
    env = Calculator()
    assert env.reset({"prompt": "Ann has 12, Bo has 31 coins.", "answer": "43"}) == "Ann has 12, Bo has 31 coins."
    assert env.step("<calc>12+31</calc>") == Step("<result> 43</result>", tool_call=True)
    assert env.step("<calc>12+</calc>").error == "calc: cannot parse '12+'"
    assert env.step("so 43") == Step(None, reward=1.0, done=True)
    env.reset({"prompt": "p", "answer": "43"})
    assert env.step("it is 42").reward == 0.0
    prompt, numbers = calculator_problem(random.Random(3))
    assert [int(word) for word in prompt.replace(",", " ").split() if word.isdigit()] == numbers
    assert 3 <= len(numbers) <= 5 and all(10 <= n <= 99 for n in numbers)
    chat = Calculator(ChatTemplate(qwen))
    chat.reset({"prompt": "p", "answer": "43"})
    assert chat.step('<tool_call>{"name": "calc", "arguments": {"expression": "12+31"}}</tool_call>').tool_call
    assert chat.step("The total is 43.") == Step(None, reward=1.0, done=True)
    bare = chat.without_tools()
    bare.reset({"prompt": "p", "answer": "43"})
    assert bare.step('<tool_call>{"name": "calc", "arguments": {"expression": "43"}}</tool_call>').done


def test_guess_says_higher_or_lower_and_ends_after_the_last_guess():
    env = Guess()
    env.reset({"answer": 20})
    assert env.step("16") == Step(" higher.") and env.step("24") == Step(" lower.")
    assert env.step("no idea").error == "no number"
    assert env.step("20") == Step(None, reward=1.0, done=True)
    env.reset({"answer": 1})
    steps = [env.step("5") for _ in range(GUESSES)]
    assert steps[-1] == Step(None, done=True) and not any(s.done for s in steps[:-1])
    assert CEILING == {"success_rate": 1.0, "mean_turns": 135 / 32}
    env.reset({"answer": 20})
    assert env.step("-3") == Step(" higher.")  # the verifiers' answer rule: a sign is read


def test_guess_speaks_as_the_user_under_a_chat_template(qwen):
    env = Guess(ChatTemplate(qwen))
    assert env.reset({"answer": 20}).endswith("<|im_start|>assistant\n")  # no prompt column: the intro, rendered
    assert env.step("16").observation == "\n<|im_start|>user\nhigher.<|im_end|>\n<|im_start|>assistant\n"


def test_env_kind_names_a_builtin_or_a_users_class_or_says_what_is_valid():
    tags = PlainTags()
    assert environment_factory("none", tags) is None
    assert isinstance(environment_factory("guess", tags)(), Guess)
    assert environment_factory("calculator", tags)().dialogue is tags  # a built-in speaks the stage's dialogue
    assert environment_factory("python:pipeline.envs.calculator:Calculator", tags) is Calculator
    with pytest.raises(ValueError, match=r"env.kind: 'chess' is not one of none, calculator, guess, python:"):
        environment_factory("chess", tags)
    with pytest.raises(ValueError, match=r"env.kind: cannot import 'Nope' from module 'pipeline.envs.guess'"):
        environment_factory("python:pipeline.envs.guess:Nope", tags)


def test_the_demonstrations_are_one_row_per_policy_turn_with_the_history_as_prompt():
    from pipeline.tasks.tools import calculator_splits, guess_splits

    splits = calculator_splits(200, 5, 5, 0.3, seed=0)
    train = splits["train"]
    firsts = train[train["turn"] == 0]
    assert len(firsts) == 200 and firsts["prompt"].is_unique
    followups = train[train["turn"] == 1]
    for row in followups.itertuples():  # the second turn's history: the problem, the call, the tool's result
        assert row.prompt.count("<calc>") == 1 and row.prompt.endswith("</result>") and "<result>" not in row.completion
    good = sum(row.completion.strip() == row.answer for row in followups.itertuples())
    assert 0.6 < good / len(firsts) < 0.8  # 30 % demonstrated badly: no tool, or a call that leaves a number out
    assert set(splits["test"]["turn"]) == {0} and not set(splits["test"]["prompt"]) & set(train["prompt"])

    games = guess_splits(50, 5, 5, 0.0, seed=0)["train"]
    env, ends = Guess(), 0
    for game in games[games["turn"] == 0].itertuples():  # replayed in the environment, binary search wins
        env.reset({"prompt": game.prompt, "answer": game.answer})
        turns = games[(games["answer"] == game.answer) & games["prompt"].str.startswith(game.prompt)]
        steps = [env.step(row.completion) for row in turns.itertuples()]
        ends += steps[-1].reward == 1.0
    assert ends == 50


def test_env_tools_false_trains_and_measures_the_environment_without_its_tools():
    from pipeline.methods.environments import episode_spec
    from tests.defaults import default_section

    tokenizer = chat_tokenizer()  # no template is set: the tag protocol
    tokenizer.chat_template = None
    tokenizer.add_special_tokens({"additional_special_tokens": ["<calc>", "</calc>"]})
    with_tool = episode_spec(default_section("env", kind="calculator"), tokenizer)
    assert with_tool.tool_stops == (tokenizer.convert_tokens_to_ids("</calc>"),) and with_tool.make_bare is not None
    bare = episode_spec(default_section("env", kind="calculator", tools=False), tokenizer)
    env = bare.make_env()
    env.reset({"prompt": "p", "answer": "19"})
    assert env.step("<calc> 12 + 7</calc>") == Step(None, reward=0.0, done=True)  # the call is read as the answer
    assert bare.tool_stops == () and bare.make_bare is None
    with pytest.raises(ValueError, match="env.tools: false, but env.kind guess has no variant without tools"):
        episode_spec(default_section("env", kind="guess", tools=False), tokenizer)
