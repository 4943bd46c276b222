"""The embedded multi-turn tasks (`prepare.source: calculator`, `guess`): rows for `env.kind` of the same name, and
SFT demonstrations of how to act in them, one row per policy turn.

A demonstration turn's prompt is the whole history before it (the first observation, earlier turns, the
environment's answers) and its completion is that turn alone, so SFT trains on the policy's tokens only and never
on a tool's result. Histories are written as the rollouts build them: a tool call ends on its closing tag (a
single token of the scratch tokenizer, trained with the tags: `SPECIAL_TOKENS`), a guess on EOS.

- `calculator`: "Q: Ann has 12 apples, Bo has 31 apples, Cy has 7 apples. How many apples in all?\\nA:"; the
  demonstration calls `<calc>12+31+7</calc>`, reads `<result>50</result>` and answers ` 50`. A share
  `prepare.frac_wrong` of the training problems is demonstrated badly, half by answering without the tool (a sum off
  by 1 to 10), half by a call that leaves out one number (answered consistently from the wrong result).
- `guess`: "Game 17: guess my number from 1 to 32 ...". The demonstration is binary search; a share `frac_wrong`
  of the training games guesses at random within what the answers leave instead.
Every row carries its `answer` (the sum; the secret) and its `turn` (0: the episode's first, the rows `ppo` starts
its episodes from). Prompts are unique, so the split by prompt holds.
"""

from __future__ import annotations

import random

import pandas as pd

from pipeline.data.tokenization import EOS_TOKEN
from pipeline.envs.guess import HIGH, LOW
from pipeline.envs.tools import RESULT_CLOSE, RESULT_OPEN, closing, opening, tag_tokens

NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gil", "Hal")
ITEMS = ("apples", "books", "coins", "stamps", "shells")
CALC_OPEN, CALC_CLOSE = opening("calc"), closing("calc")
SPECIAL_TOKENS = tag_tokens(["calc"])


def calculator_problem(rng: random.Random) -> tuple[str, list[int]]:
    """A word problem over 3 to 5 two-digit counts, and the counts."""
    count = rng.randint(3, 5)
    numbers = [rng.randint(10, 99) for _ in range(count)]
    item = rng.choice(ITEMS)
    parts = ", ".join(f"{name} has {n} {item}" for name, n in zip(rng.sample(NAMES, count), numbers, strict=True))
    return f"Q: {parts}. How many {item} in all?\nA:", numbers


def _calculator_turns(prompt: str, numbers: list[int], rng: random.Random, wrong: bool) -> list[tuple[str, str]]:
    """(history, turn) of each policy turn of one demonstration."""
    if wrong and rng.random() < 0.5:  # in its head, off by a little
        return [(prompt, f" {sum(numbers) + rng.choice((-1, 1)) * rng.randint(1, 10)}")]
    used = numbers if not wrong else [n for i, n in enumerate(numbers) if i != rng.randrange(len(numbers))]
    call = f"{CALC_OPEN}{'+'.join(map(str, used))}{CALC_CLOSE}"
    result = f"{RESULT_OPEN}{sum(used)}{RESULT_CLOSE}"
    return [(prompt, call), (prompt + call + result, f" {sum(used)}")]


def calculator_splits(n_train: int, n_val: int, n_test: int, frac_wrong: float, seed: int) -> dict[str, pd.DataFrame]:
    """Train rows, one per demonstrated turn; val and test rows, one per problem (its first turn), all unique."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {}
    for name, count in (("test", n_test), ("val", n_val), ("train", n_train)):
        rows = []
        while len({row["answer_of"] for row in rows}) < count:
            prompt, numbers = calculator_problem(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            turns = _calculator_turns(prompt, numbers, rng, name == "train" and rng.random() < frac_wrong)
            turns = turns if name == "train" else turns[:1]
            answer = str(sum(numbers))
            rows += [
                {"prompt": p, "completion": c, "answer": answer, "turn": t, "answer_of": prompt}
                for t, (p, c) in enumerate(turns)
            ]
        splits[name] = pd.DataFrame(rows).drop(columns="answer_of")
    return splits


def guess_intro(game: int) -> str:
    return f"Game {game}: guess my number from {LOW} to {HIGH}. You have 6 guesses.\nGuess:"


def _guess_turns(intro: str, secret: int, rng: random.Random, wrong: bool) -> list[tuple[str, str]]:
    low, high, history, turns = LOW, HIGH, intro, []
    while True:
        guess = rng.randint(low, high) if wrong else (low + high) // 2
        turns.append((history, f" {guess}"))
        if guess == secret or len(turns) == 6:
            return turns
        low, high = (guess + 1, high) if guess < secret else (low, guess - 1)
        history += f" {guess}{EOS_TOKEN}{' higher.' if guess < secret else ' lower.'}"


def guess_splits(n_train: int, n_val: int, n_test: int, frac_wrong: float, seed: int) -> dict[str, pd.DataFrame]:
    """Train rows, one per demonstrated guess; val and test rows, one per game (its first guess)."""
    rng = random.Random(seed)
    splits, game = {}, 0
    for name, count in (("test", n_test), ("val", n_val), ("train", n_train)):
        rows = []
        for _ in range(count):
            game += 1
            secret, intro = rng.randint(LOW, HIGH), guess_intro(game)
            turns = _guess_turns(intro, secret, rng, name == "train" and rng.random() < frac_wrong)
            shown = turns if name == "train" else turns[:1]
            rows += [{"prompt": p, "completion": c, "answer": str(secret), "turn": t} for t, (p, c) in enumerate(shown)]
        splits[name] = pd.DataFrame(rows)
    return splits
