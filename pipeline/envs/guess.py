"""`guess`: find a secret number in 1..32, told "higher" or "lower" after each guess, in at most 6 guesses.

Each policy turn is one guess (its final number, the `exact` verifier's rule); the episode ends with reward 1 on the
secret, with 0 after the sixth wrong guess. A turn with no number is answered with an error observation and counts
as a guess. Binary search is optimal: it always wins, in 135/32 = 4.22 guesses on average over the 32 secrets
(`CEILING`). The answers are the environment's words (`Dialogue.said`: a user turn under a chat template).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.envs.base import Step
from pipeline.envs.dialogue import Dialogue, PlainTags
from pipeline.models.verifiers import final_answer, normalize

LOW, HIGH, GUESSES = 1, 32, 6
CEILING = {"success_rate": 1.0, "mean_turns": 135 / 32}
"""What the optimal policy (binary search from the middle) scores over the 32 secrets, each once."""


def intro(game: int | None = None) -> str:
    """The game's opening words (numbered in the embedded data, where every prompt is unique)."""
    head = "" if game is None else f"Game {game}: "
    return f"{head}guess my number from {LOW} to {HIGH}. You have {GUESSES} guesses.\nGuess:"


def guessed(action: str) -> int | None:
    """The integer a turn guesses (its final answer), or None."""
    got = final_answer(action)
    value = normalize(got) if got is not None else ""
    return int(value) if value.lstrip("-").isdigit() else None


class Guess:
    """One game (see the module docstring); the row's `answer` is the secret."""

    ceiling = ("binary search", CEILING["success_rate"], CEILING["mean_turns"])
    """The optimal policy's name, success rate and mean turns: `evaluate` prints them beside the policies."""

    def __init__(self, dialogue: Dialogue | None = None) -> None:
        self.dialogue = dialogue if dialogue is not None else PlainTags()
        self.secret, self.guesses = 0, 0

    def reset(self, row: Mapping[str, Any]) -> str:
        self.secret, self.guesses = int(row["answer"]), 0
        if not LOW <= self.secret <= HIGH:
            raise ValueError(f"secret {self.secret} is outside {LOW}..{HIGH}")
        return str(row.get("prompt") or self.dialogue.first(intro(), ()))

    def step(self, action: str) -> Step:
        self.guesses += 1
        got = guessed(action)
        if got == self.secret:
            return Step(None, reward=1.0, done=True)
        if self.guesses >= GUESSES:
            return Step(None, done=True)
        if got is None:
            return Step(self.dialogue.said(f" say a number from {LOW} to {HIGH}."), error="no number")
        return Step(self.dialogue.said(" higher." if got < self.secret else " lower."))
