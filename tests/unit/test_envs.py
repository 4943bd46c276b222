"""The embedded environments and the tag protocol, step by step, and `env.kind`'s loader."""

import random

import pytest

from pipeline.envs.base import Step
from pipeline.envs.calculator import Calculator
from pipeline.envs.guess import CEILING, GUESSES, Guess
from pipeline.envs.registry import environment_factory
from pipeline.envs.tools import answer_call, calculate
from pipeline.tasks.tools import calculator_problem


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


def test_each_malformed_call_comes_back_as_an_error_observation():
    def broken(arguments: str) -> str:
        raise RuntimeError("disk on fire")

    tools = {"calc": calculate, "lookup": broken}
    assert answer_call("<calc>12+7</calc>", tools).observation == "<result>19</result>"
    assert answer_call("the answer is 19", tools) is None  # no call: the environment reads it as an answer
    for action, reason in [
        ("12+7</calc>", "</calc> without <calc>"),  # bad tag
        ("<calc> </calc>", "empty <calc> call"),
        ("<calc>12 plus 7</calc>", "calc: cannot parse '12 plus 7'"),  # arguments the tool refuses
        ("<lookup>x</lookup>", "lookup: disk on fire"),  # a tool that raises
    ]:
        answer = answer_call(action, tools)
        assert answer.error == reason and answer.observation == f"<result>error: {reason}</result>", action


def test_the_calculator_answers_a_call_and_scores_the_final_answer():
    env = Calculator()
    assert env.reset({"prompt": "Ann has 12, Bo has 31 coins.", "answer": "43"}) == "Ann has 12, Bo has 31 coins."
    assert env.step("<calc>12+31</calc>") == Step("<result>43</result>", tool_call=True)
    assert env.step("<calc>12+</calc>").error == "calc: cannot parse '12+'"
    assert env.step("so 43") == Step(None, reward=1.0, done=True)
    env.reset({"prompt": "p", "answer": "43"})
    assert env.step("it is 42").reward == 0.0
    prompt, numbers = calculator_problem(random.Random(3))
    assert [int(word) for word in prompt.replace(",", " ").split() if word.isdigit()] == numbers
    assert 3 <= len(numbers) <= 5 and all(10 <= n <= 99 for n in numbers)


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


def test_env_kind_names_a_builtin_or_a_users_class_or_says_what_is_valid():
    assert environment_factory("none") is None
    assert environment_factory("guess") is Guess
    assert environment_factory("python:pipeline.envs.calculator:Calculator") is Calculator
    with pytest.raises(ValueError, match=r"env.kind: 'chess' is not one of none, calculator, guess, python:"):
        environment_factory("chess")
    with pytest.raises(ValueError, match=r"env.kind: cannot import 'Nope' from module 'pipeline.envs.guess'"):
        environment_factory("python:pipeline.envs.guess:Nope")


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
