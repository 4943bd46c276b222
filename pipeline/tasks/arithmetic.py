"""The embedded verifiable task (`prepare.source: arithmetic`): sums of two numbers, with reference answers.

A prompt asks for `a + b` (0 <= a, b < `MAX_OPERAND`); a demonstration restates the sum and gives its answer after
`####`, the rule a verifier reads (`pipeline.models.verifiers.final_answer`):

    Q: 23 + 48 = ?
    A: 23 + 48 = 71. #### 71

A share `prepare.frac_wrong` of the training demonstrations state a wrong sum (off by 1 or 2, consistently in both
places), so SFT learns a policy that is often but not always right: the room online RL from the verifier closes.
Validation and test rows are always right; their prompts never occur in training (the split is by prompt).
"""

from __future__ import annotations

import random

import pandas as pd

MAX_OPERAND = 50
PROMPT = "Q: {a} + {b} = ?\nA:"
COMPLETION = " {a} + {b} = {s}. #### {s}"


def _row(a: int, b: int, rng: random.Random, frac_wrong: float) -> dict[str, str]:
    total = a + b
    stated = total
    if rng.random() < frac_wrong:
        stated = max(0, total + rng.choice((-2, -1, 1, 2)))
    return {"prompt": PROMPT.format(a=a, b=b), "completion": COMPLETION.format(a=a, b=b, s=stated),
            "answer": str(total)}  # fmt: skip


def arithmetic_splits(n_train: int, n_val: int, n_test: int, frac_wrong: float, seed: int) -> dict[str, pd.DataFrame]:
    """Train rows (with wrong demonstrations) and held-out val/test rows on prompts train never sees."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    rng.shuffle(pairs)
    if n_val + n_test >= len(pairs):
        raise ValueError(f"prepare.n_val + prepare.n_test: {n_val + n_test} leaves no arithmetic prompt for training "
                         f"({len(pairs)} distinct sums); lower them")  # fmt: skip
    test, val, train = pairs[:n_test], pairs[n_test : n_test + n_val], pairs[n_test + n_val :]
    rows = {
        "train": [_row(*train[i % len(train)], rng, frac_wrong) for i in range(n_train)],
        "val": [_row(a, b, rng, 0.0) for a, b in val],
        "test": [_row(a, b, rng, 0.0) for a, b in test],
    }
    return {name: pd.DataFrame(split) for name, split in rows.items()}
