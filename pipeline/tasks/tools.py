"""The embedded multi-turn tasks (`prepare.source: calculator`, `guess`): rows for `env.kind` of the same name, and
SFT demonstrations of how to act in them, one row per policy turn.

A demonstration turn's prompt is the whole history before it (the first observation, earlier turns, the
environment's answers) and its completion is that turn alone, so SFT trains on the policy's tokens only and never
on a tool's result. Histories are written through the environment's dialogue (`pipeline.envs.dialogue`) exactly as
the rollouts build them: for the scratch model a tool call ends on its closing tag (a single token of the scratch
tokenizer, trained with the tags: `SPECIAL_TOKENS`) and a guess on EOS; for a chat model every turn is the template's
(the call a `<tool_call>`, its result a `tool` turn, each turn ending on the end-of-turn token).

- `calculator`: "Q: Ann has 12 apples, Bo has 31 apples, Cy has 7 apples. How many apples in all?\\nA:"; the
  demonstration calls `<calc> 12 + 31 + 7</calc>`, reads `<result> 50</result>` and answers ` 50`. A share
  `prepare.frac_wrong` of the training problems is demonstrated badly, half by answering without the tool (a sum off
  by 1 to 10), half by a call that leaves out one number (answered consistently from the wrong result).
- `guess`: "Game 17: guess my number from 1 to 32 ...". The demonstration is binary search; a share `frac_wrong`
  of the training games guesses at random within what the answers leave instead.
Every row carries its `answer` (the sum; the secret) and its `turn` (0: the episode's first, the rows `ppo` starts
its episodes from). Validation keeps every turn, as train does, so its loss and the preference pairs drawn from it
see answers too (first turns alone are all tool calls, which a verifier scores alike); test keeps first turns.
Prompts are unique, so the split by prompt holds.
"""

from __future__ import annotations

import random

import pandas as pd

from pipeline.envs.calculator import TOOLS
from pipeline.envs.dialogue import Dialogue, PlainTags, tag_tokens
from pipeline.envs.guess import GUESSES, HIGH, LOW, intro
from pipeline.envs.tools import CALC

NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gil", "Hal")
ITEMS = ("apples", "books", "coins", "stamps", "shells")
SPECIAL_TOKENS = tag_tokens([tool.name for tool in TOOLS])


def calculator_problem(rng: random.Random) -> tuple[str, list[int]]:
    """A word problem over 3 to 5 two-digit counts, and the counts."""
    count = rng.randint(3, 5)
    numbers = [rng.randint(10, 99) for _ in range(count)]
    item = rng.choice(ITEMS)
    parts = ", ".join(f"{name} has {n} {item}" for name, n in zip(rng.sample(NAMES, count), numbers, strict=True))
    return f"Q: {parts}. How many {item} in all?\nA:", numbers


def _calculator_turns(
    prompt: str, numbers: list[int], rng: random.Random, wrong: bool, dialogue: Dialogue
) -> list[tuple[str, str]]:
    """(history, turn) of each policy turn of one demonstration."""
    if wrong and rng.random() < 0.5:  # in its head, off by a little
        return [(prompt, f"{dialogue.answer_prefix}{sum(numbers) + rng.choice((-1, 1)) * rng.randint(1, 10)}")]
    left_out = rng.randrange(len(numbers)) if wrong else None
    used = [n for i, n in enumerate(numbers) if i != left_out]
    call = dialogue.call(CALC, dialogue.answer_prefix + " + ".join(map(str, used)))
    answered = dialogue.answer_call(call, {CALC.name: CALC})
    history = prompt + dialogue.closed(call, TOOLS) + answered.observation
    return [(prompt, call), (history, f"{dialogue.answer_prefix}{sum(used)}")]


def calculator_splits(
    n_train: int, n_val: int, n_test: int, frac_wrong: float, seed: int, dialogue: Dialogue | None = None
) -> dict[str, pd.DataFrame]:
    """Train and val rows, one per demonstrated turn (val's all good); test rows, one per problem (its first turn).
    `dialogue` writes the turns (the tag protocol by default; a chat model's template for a hub model)."""
    dialogue = dialogue if dialogue is not None else PlainTags()
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {}
    for name, count in (("test", n_test), ("val", n_val), ("train", n_train)):
        rows, problems = [], 0
        while problems < count:
            question, numbers = calculator_problem(rng)
            if question in seen:
                continue
            seen.add(question)
            problems += 1
            prompt = dialogue.first(question, TOOLS)
            turns = _calculator_turns(prompt, numbers, rng, name == "train" and rng.random() < frac_wrong, dialogue)
            turns = turns if name != "test" else turns[:1]  # test: where episodes start; val: every turn, as train
            answer = str(sum(numbers))
            rows += [{"prompt": p, "completion": c, "answer": answer, "turn": t} for t, (p, c) in enumerate(turns)]
        splits[name] = pd.DataFrame(rows)
    return splits


def _guess_turns(first: str, secret: int, rng: random.Random, wrong: bool, dialogue: Dialogue) -> list[tuple[str, str]]:
    low, high, history, turns = LOW, HIGH, first, []
    while True:
        guess = rng.randint(low, high) if wrong else (low + high) // 2
        turn = f"{dialogue.answer_prefix}{guess}"
        turns.append((history, turn))
        if guess == secret or len(turns) == GUESSES:
            return turns
        low, high = (guess + 1, high) if guess < secret else (low, guess - 1)
        history += dialogue.closed(turn, ()) + dialogue.said(" higher." if guess < secret else " lower.")


def guess_splits(
    n_train: int, n_val: int, n_test: int, frac_wrong: float, seed: int, dialogue: Dialogue | None = None
) -> dict[str, pd.DataFrame]:
    """Train and val rows, one per demonstrated guess (val's all binary search); test rows, one per game (its first
    guess)."""
    dialogue = dialogue if dialogue is not None else PlainTags()
    rng = random.Random(seed)
    splits, game = {}, 0
    for name, count in (("test", n_test), ("val", n_val), ("train", n_train)):
        rows = []
        for _ in range(count):
            game += 1
            secret, first = rng.randint(LOW, HIGH), dialogue.first(intro(game), ())
            turns = _guess_turns(first, secret, rng, name == "train" and rng.random() < frac_wrong, dialogue)
            shown = turns if name != "test" else turns[:1]
            rows += [{"prompt": p, "completion": c, "answer": str(secret), "turn": t} for t, (p, c) in enumerate(shown)]
        splits[name] = pd.DataFrame(rows)
    return splits
