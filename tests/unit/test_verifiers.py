"""Verifiable rewards: the answer rule, normalisation, the checkers, their time bound, and the accuracy metrics."""

import math
import re
import time

import pytest

from pipeline.config import ConfigError, load_config, read_params
from pipeline.eval.policies import accuracy_metrics, majority_vote, pass_at_k
from pipeline.models.verifiers import Verifier, final_answer, lookup_answers, normalize
from pipeline.tasks.arithmetic import arithmetic_splits
from tests.defaults import ROOT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the total is 1,234 apples.", "1,234"),  # thousands commas
        ("The change is -17 degrees", "-17"),  # negative
        ("3 + 4 = 7. #### 7", "7"),  # after ####, not the last number before it
        ("Janet has 16 eggs ... #### 72\nThe end, 99", "72"),  # GSM8K: the text after the last ####, its line only
        ("first 3, so \\boxed{\\frac{1}{2}} and later 9", "\\frac{1}{2}"),  # the last \boxed{}, braces balanced
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("costs 3.50 dollars", "3.50"),  # decimals
        ("no answer here", None),
        ("####", None),  # nothing after the marker
        ("\\boxed{unbalanced", None),  # an unbalanced box answers nothing (no fallback to numbers inside it)
    ],
)
def test_final_answer_rule(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1,234", "1234"),
        ("72.0", "72"),
        ("072", "72"),
        (" $72$ ", "72"),
        ("72.", "72"),
        ("-0.50", "-0.5"),
        ("Paris", "paris"),
    ],
)
def test_normalize_gives_one_spelling(a, b):
    assert normalize(a) == normalize(b)


def test_normalize_keeps_different_answers_apart():
    assert normalize("72") != normalize("73") and normalize("1,234") != normalize("1.234")


def test_exact_verifier_checks_final_answers_against_gsm8k_style_references():
    verifier = Verifier("exact", timeout_s=10)
    try:
        responses = ["so #### 72", "it is 71", "I think 72.0", "nothing", "\\boxed{72}", "1,000 then 72"]
        assert verifier.score(["q"] * 6, responses, ["He pays 8 * 9 = 72. #### 72"] * 6) == [1, 0, 1, 0, 1, 1]
    finally:
        verifier.close()


def test_math_verifier_checks_equivalence():
    verifier = Verifier("math", timeout_s=20)
    try:
        responses = ["\\boxed{\\frac{1}{2}}", "0.5", "\\boxed{\\frac{1}{3}}"]
        assert verifier.score(["q"] * 3, responses, ["#### 0.5"] * 3) == [1.0, 1.0, 0.0]
    finally:
        verifier.close()


def test_format_reward_adds_its_weight_to_matching_responses():
    verifier = Verifier("exact", timeout_s=10, format_pattern=r"#### -?\d+", format_weight=0.25)
    try:
        assert verifier.score(["q"] * 3, ["#### 5", "5", "#### 4"], ["5"] * 3) == [1.25, 1.0, 0.25]
    finally:
        verifier.close()


def test_a_hanging_check_scores_zero_within_the_bound_is_counted_and_the_next_checks_run():
    verifier = Verifier("python:tests.verifier_functions:sleeps", timeout_s=1.5)
    try:
        start = time.monotonic()
        scores = verifier.score(["q"] * 3, ["42", "hang 42", "42"], ["42"] * 3)
        elapsed = time.monotonic() - start
        assert scores == [1.0, 0.0, 1.0]  # the hung check scored 0; the worker was replaced for the next one
        assert verifier.timeouts == 1
        assert elapsed < 1.5 + 10  # the bound, plus the replacement worker's start; never the 60 s sleep
    finally:
        verifier.close()


def test_python_verifier_that_cannot_be_imported_names_the_key():
    with pytest.raises(ValueError, match=r"cannot import 'nope' from module 'tests.verifier_functions'"):
        Verifier("python:tests.verifier_functions:nope", timeout_s=5)
    with pytest.raises(ValueError, match=r"judge.verifier: cannot import 'f' from module 'no_such_module_here'"):
        Verifier("python:no_such_module_here:f", timeout_s=5)
    with pytest.raises(ValueError, match="is not one of exact, math, python:<module>:<name>"):
        Verifier("fuzzy", timeout_s=5)


def test_a_verifier_that_raises_fails_loudly_naming_it():
    verifier = Verifier("python:tests.verifier_functions:fails", timeout_s=5)
    try:
        with pytest.raises(ValueError, match="raised on a response: RuntimeError: this verifier has a bug"):
            verifier.score(["q"], ["1"], ["1"])
    finally:
        verifier.close()


def test_missing_answer_names_the_prompt():
    with pytest.raises(KeyError, match="no reference answer for prompt 'Q: 2 \\+ 2'"):
        lookup_answers({"Q: 1 + 1": "2"}, ["Q: 1 + 1", "Q: 2 + 2"])


def test_pass_at_k_matches_a_hand_computation():
    # n = 5 samples, c = 2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@4 = 1 (3 < 4 wrong)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0 and pass_at_k(5, 0, 3) == 0.0


def test_accuracy_metrics_by_hand():
    correct = [[1, 0, 0, 0], [1, 1, 1, 0]]
    scores = [[1.25, 0.25, 0, 0], [1, 1, 1, 0]]
    responses = [["#### 5", "#### 6", "#### 6", "x"], ["7", "7", "#### 7", "8"]]
    metrics = accuracy_metrics(correct, scores, responses, ["5", "#### 7"], k=4)
    assert metrics["pass_at_1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert metrics["pass_at_4"] == 1.0
    assert metrics["mean_at_4"] == pytest.approx((1.5 / 4 + 3 / 4) / 2)
    assert metrics["maj_at_4"] == pytest.approx(0.5)  # prompt 1 votes 6 (wrong), prompt 2 votes 7 (right)
    assert majority_vote(["no", "answer"]) is None and not math.isnan(metrics["maj_at_4"])


def test_arithmetic_task_splits_by_prompt_keeps_answers_and_states_the_wrong_share():
    splits = arithmetic_splits(4000, 100, 100, frac_wrong=0.3, seed=0)
    prompts = {name: set(frame["prompt"]) for name, frame in splits.items()}
    assert not prompts["train"] & (prompts["val"] | prompts["test"]) and not prompts["val"] & prompts["test"]
    for name, frame in splits.items():
        right = [final_answer(c) == a for c, a in zip(frame["completion"], frame["answer"], strict=True)]
        a, b = zip(*(map(int, re.findall(r"\d+", p)) for p in frame["prompt"]), strict=True)
        assert frame["answer"].tolist() == [str(x + y) for x, y in zip(a, b, strict=True)], name  # the true sums
        if name == "train":
            assert 0.25 < 1 - sum(right) / len(right) < 0.35  # prepare.frac_wrong of the demonstrations are wrong
        else:
            assert all(right), name  # held-out rows are always right


def test_verifier_config_needs_answers_and_rl_needs_a_reward():
    params = read_params(ROOT / "params.yaml")
    params["judge"]["kind"] = "verifier"
    with pytest.raises(ConfigError, match="prepare.answer_column: judge.kind 'verifier' checks responses"):
        load_config(params)
    params["prepare"]["source"] = "arithmetic"
    assert load_config(params).judge.kind == "verifier"
    params["ppo"].update(reward_model_weight=0.0, judge_weight=0.0)
    with pytest.raises(ConfigError, match="ppo.reward_model_weight \\+ ppo.judge_weight .*: all are 0"):
        load_config(params)
    params["env"].update(kind="guess")  # an environment's reward is enough
    params["monitor"].update(every_n_rollouts=0)  # the monitor is single-turn
    assert load_config(params).env.kind == "guess"
