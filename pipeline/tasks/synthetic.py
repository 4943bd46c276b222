"""The embedded task: a seeded grammar of short movie reviews whose sentiment the gold judge can read.

A review is a neutral *prompt* (a review opening naming an invented film) and a *continuation* of one to three
sentences built from graded sentiment adjectives and verbs, intensifiers and dampeners, negation ("not bad"),
contrast clauses ("..., but ..."; VADER weights the clause after "but") and neutral filler. Every word outside
the sentiment lists carries no VADER valence (a unit test keeps it so), so the gold score of a continuation is
decided by the words the grammar chose for its sentiment.

The raw grammar is not balanced by itself, so each continuation first draws a target class (positive, negative
or neutral, with fractions from params) and is redrawn until the gold judge agrees with the class. That makes
the SFT data sentiment-balanced by construction (mean gold score near 0), which leaves room for alignment to
move it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.models.judges import gold_score

POSITIVE_ADJECTIVES = (
    "good", "nice", "great", "excellent", "wonderful", "superb", "brilliant", "amazing", "beautiful",
    "charming", "delightful", "enjoyable", "fantastic", "lovely", "clever", "pleasant", "impressive",
    "gorgeous", "funny", "perfect", "fresh", "stunning",
)  # fmt: skip
NEGATIVE_ADJECTIVES = (
    "bad", "poor", "weak", "boring", "dull", "awful", "terrible", "horrible", "dreadful", "painful", "messy",
    "annoying", "disappointing", "stupid", "ugly", "pathetic", "lazy", "confusing",
)  # fmt: skip
POSITIVE_VERBS = ("loved", "enjoyed", "admired", "liked", "appreciated")
NEGATIVE_VERBS = ("hated", "disliked", "despised")
INTENSIFIERS = ("very", "really", "extremely", "incredibly")
DAMPENERS = ("somewhat", "slightly")
SENTIMENT_WORDS = frozenset(POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + POSITIVE_VERBS + NEGATIVE_VERBS)

ASPECTS = (
    "acting", "plot", "story", "music", "soundtrack", "script", "dialogue", "cast", "pacing", "ending",
    "editing", "lighting", "camera work", "set design", "score", "first half", "second half", "lead actor",
    "cinematography", "sound design",
)  # fmt: skip
LINKING_VERBS = ("was", "felt", "seemed")
TITLE_NOUNS = (
    "River", "Train", "Garden", "Letter", "Station", "Island", "Mirror", "Window", "Harbor", "Bridge",
    "Tower", "Orchard", "Lantern", "Compass", "Ferry", "Archive",
)  # fmt: skip
PLACE_NAMES = (
    "Marlow",
    "Ashford",
    "Keswick",
    "Dunmore",
    "Halden",
    "Brixley",
    "Corvel",
    "Elmstead",
    "Tarrow",
    "Wyck",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
RELATIONS = ("brother", "sister", "cousin", "neighbour", "parents", "uncle", "aunt", "roommate")
VENUES = ("cinema", "theater", "library screening", "drive-in")
SETTINGS = ("small town", "big city", "train station", "harbor", "village", "hospital", "school", "farm")
SEASONS = ("winter", "summer", "spring", "autumn")

PROMPT_TEMPLATES = (
    "I watched {title} on {day} with my {relation}.",
    "Notes on {title}, seen on {day} at the {venue}:",
    "{title} runs {minutes} minutes.",
    "My review of {title}, which I saw with my {relation}:",
    "I saw {title} at the {venue} on {day}.",
)
FILLER_TEMPLATES = (
    "It runs about {minutes} minutes.",
    "The story takes place in a {setting}.",
    "Most of it was shot in {season}.",
    "The second half is set in a {setting}.",
    "There is a long scene at the {setting}.",
    "I saw it on {day} with my {relation}.",
)
CLASSES = ("positive", "negative", "neutral")


@dataclass(frozen=True)
class Review:
    prompt: str
    completion: str
    gold: float


def generate_reviews(
    n: int,
    rng: random.Random,
    *,
    frac_positive: float,
    frac_negative: float,
    exclude_prompts: frozenset[str] = frozenset(),
    unique_prompts: bool = False,
) -> list[Review]:
    """Draw `n` reviews with class fractions as given; prompts in `exclude_prompts` are never used.

    Args:
        n: number of reviews.
        rng: the seeded source of every choice.
        frac_positive: share of positive continuations (gold > 0.05).
        frac_negative: share of negative continuations (gold < -0.05); the rest are neutral (gold == 0).
        exclude_prompts: prompts reserved for other splits.
        unique_prompts: draw each prompt at most once (held-out splits).
    """
    n_positive = round(n * frac_positive)
    n_negative = round(n * frac_negative)
    classes = ["positive"] * n_positive + ["negative"] * n_negative + ["neutral"] * (n - n_positive - n_negative)
    rng.shuffle(classes)
    used: set[str] = set()
    reviews = []
    for target in classes:
        prompt = _draw_prompt(rng)
        while prompt in exclude_prompts or (unique_prompts and prompt in used):
            prompt = _draw_prompt(rng)
        used.add(prompt)
        completion, gold = _draw_continuation(rng, target)
        reviews.append(Review(prompt=prompt, completion=completion, gold=gold))
    return reviews


def grammar_words() -> set[str]:
    """Every lower-case word the grammar can emit outside the sentiment lists (kept valence-free by a test)."""
    texts: list[str] = [
        *ASPECTS,
        *LINKING_VERBS,
        *INTENSIFIERS,
        *DAMPENERS,
        *TITLE_NOUNS,
        *PLACE_NAMES,
        *DAYS,
    ]
    texts += [*RELATIONS, *VENUES, *SETTINGS, *SEASONS, *PROMPT_TEMPLATES, *FILLER_TEMPLATES]
    texts += ["the was not but i would it to"]
    words = set()
    for text in texts:
        for word in text.replace("{", " ").replace("}", " ").split():
            word = word.strip(".,:").lower()
            if word.isalpha() and word not in SENTIMENT_WORDS:
                words.add(word)
    return words


def _title(rng: random.Random) -> str:
    noun, place = rng.choice(TITLE_NOUNS), rng.choice(PLACE_NAMES)
    return f"The {noun} of {place}" if rng.random() < 0.5 else f"{place} {noun}"


def _draw_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(
        title=_title(rng),
        day=rng.choice(DAYS),
        relation=rng.choice(RELATIONS),
        venue=rng.choice(VENUES),
        minutes=rng.randrange(80, 180, 5),
    )


def _filler(rng: random.Random) -> str:
    return rng.choice(FILLER_TEMPLATES).format(
        minutes=rng.randrange(80, 180, 5),
        setting=rng.choice(SETTINGS),
        season=rng.choice(SEASONS),
        day=rng.choice(DAYS),
        relation=rng.choice(RELATIONS),
    )


def _sentiment_sentence(rng: random.Random, positive: bool) -> str:
    """One sentence whose intended polarity is `positive` (True) or negative (False)."""
    same = POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES
    other = NEGATIVE_ADJECTIVES if positive else POSITIVE_ADJECTIVES
    aspect, aspect2 = rng.sample(ASPECTS, 2)
    kind = rng.random()
    if kind < 0.45:
        modifier = rng.choice(("", "", *INTENSIFIERS, *DAMPENERS))
        modifier = f"{modifier} " if modifier else ""
        return f"The {aspect} {rng.choice(LINKING_VERBS)} {modifier}{rng.choice(same)}."
    if kind < 0.6:
        # "not bad" reads as positive and "not good" as negative to VADER, as to people.
        return f"The {aspect} was not {rng.choice(other)}."
    if kind < 0.8:
        verbs = POSITIVE_VERBS if positive else NEGATIVE_VERBS
        return f"I {rng.choice(('', 'really ', 'truly '))}{rng.choice(verbs)} the {aspect}."
    return f"The {aspect} was {rng.choice(other)}, but the {aspect2} was {rng.choice(same)}."


def _compose(rng: random.Random, target: str) -> str:
    if target == "neutral":
        sentences = [_filler(rng) for _ in range(rng.randint(1, 2))]
    else:
        sentences = [_sentiment_sentence(rng, target == "positive") for _ in range(rng.randint(1, 2))]
        if rng.random() < 0.4:
            sentences.insert(rng.randint(0, len(sentences)), _filler(rng))
    return " " + " ".join(sentences)


def _agrees(target: str, gold: float) -> bool:
    if target == "positive":
        return gold > 0.05
    if target == "negative":
        return gold < -0.05
    return gold == 0.0


def _draw_continuation(rng: random.Random, target: str) -> tuple[str, float]:
    for _ in range(100):
        text = _compose(rng, target)
        gold = gold_score(text)
        if _agrees(target, gold):
            return text, gold
    raise RuntimeError(f"the grammar failed to produce a {target} continuation in 100 draws")


def class_fractions(golds: Sequence[float]) -> dict[str, float]:
    """Share of positive (> 0.05), negative (< -0.05) and neutral gold scores."""
    n = max(len(golds), 1)
    return {
        "positive": sum(g > 0.05 for g in golds) / n,
        "negative": sum(g < -0.05 for g in golds) / n,
        "neutral": sum(-0.05 <= g <= 0.05 for g in golds) / n,
    }
