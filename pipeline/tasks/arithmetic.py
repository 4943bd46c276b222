"""The embedded verifiable task (`prepare.source: arithmetic`): word problems over sums, with reference answers.

A prompt asks for `a + b` (0 <= a, b < `MAX_OPERAND`) in a one-line story about one of `NAMES`; a demonstration
restates the sum and gives its answer after `####`, the rule a verifier reads
(`pipeline.models.verifiers.final_answer`):

    Q: Ava has 12 coins and finds 7 more. How many coins now?
    A: 12 + 7 = 19. #### 19

A share `prepare.frac_wrong` of the training demonstrations state a wrong sum (off by 1 or 2, consistently in both
places), so SFT learns a policy that is often but not always right: the room online RL from the verifier closes.
Validation and test rows are always right and their prompts never occur in training (the split is by prompt); the
sums they ask are ones training covers under other names, as a held-out GSM8K problem reuses familiar arithmetic.
"""

from __future__ import annotations

import random

import pandas as pd

MAX_OPERAND = 20
NAMES = (
    "Ava",
    "Ben",
    "Cleo",
    "Dan",
    "Eve",
    "Finn",
    "Gus",
    "Hana",
    "Ivo",
    "Jo",
    "Kai",
    "Lea",
    "Max",
    "Nia",
    "Oto",
    "Pia",
    "Quin",
    "Rui",
    "Sam",
    "Tess",
)
PROMPT = "Q: {name} has {a} coins and finds {b} more. How many coins now?\nA:"
COMPLETION = " {a} + {b} = {s}. #### {s}"


def _row(name: str, a: int, b: int, rng: random.Random, frac_wrong: float) -> dict[str, str]:
    total = a + b
    stated = total
    if rng.random() < frac_wrong:
        stated = max(0, total + rng.choice((-2, -1, 1, 2)))
    return {
        "prompt": PROMPT.format(name=name, a=a, b=b),
        "completion": COMPLETION.format(a=a, b=b, s=stated),
        "answer": str(total),
    }


def arithmetic_splits(n_train: int, n_val: int, n_test: int, frac_wrong: float, seed: int) -> dict[str, pd.DataFrame]:
    """Train rows (with wrong demonstrations) and held-out val/test rows on prompts train never sees."""
    rng = random.Random(seed)
    questions = [(name, a, b) for name in NAMES for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    rng.shuffle(questions)
    if n_val + n_test >= len(questions):
        raise ValueError(
            f"prepare.n_val + prepare.n_test: {n_val + n_test} leaves no arithmetic prompt for training "
            f"({len(questions)} distinct questions); lower them"
        )
    test, val = questions[:n_test], questions[n_test : n_test + n_val]
    train = questions[n_test + n_val :]
    rows = {
        "train": [_row(*train[i % len(train)], rng, frac_wrong) for i in range(n_train)],
        "val": [_row(*question, rng, 0.0) for question in val],
        "test": [_row(*question, rng, 0.0) for question in test],
    }
    return {name: pd.DataFrame(split) for name, split in rows.items()}
