"""The gold judge: VADER's compound sentiment score, the ground truth of the embedded task.

The embedded task plays the role of the DPO paper's controlled sentiment experiment: VADER (a lexicon and rule
model, so fully offline and deterministic) stands in for the human whose preferences the pipeline learns. It
labels preference pairs and scores every policy at evaluation. Scores lie in [-1, 1]; text with no sentiment
words scores exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def gold_score(text: str) -> float:
    """VADER compound score of one text, in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def gold_scores(texts: Sequence[str]) -> list[float]:
    """VADER compound scores of many texts, in input order."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def lexicon_valence(word: str) -> float | None:
    """The VADER lexicon's valence of one lower-case word, or None when the word carries no sentiment."""
    return _analyzer().lexicon.get(word)
