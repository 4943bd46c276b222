"""The embedded environments and the tag protocol, step by step, and `env.kind`'s loader."""

import random

import pytest

from pipeline.envs.base import Step
from pipeline.envs.calculator import Calculator, problem
from pipeline.envs.guess import CEILING, GUESSES, Guess
from pipeline.envs.registry import environment_factory
from pipeline.envs.tools import answer_call, calculate


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
    prompt, answer = problem(random.Random(3))
    numbers = [int(word) for word in prompt.replace(",", " ").split() if word.isdigit()]
    assert 3 <= len(numbers) <= 5 and all(10 <= n <= 99 for n in numbers) and int(answer) == sum(numbers)


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
