import random
import statistics

from pipeline.config import PrepareConfig
from pipeline.models.judges import gold_score, lexicon_valence
from pipeline.tasks.prepare import synthetic_splits
from pipeline.tasks.synthetic import NEGATIVE_ADJECTIVES, POSITIVE_ADJECTIVES, generate_reviews, grammar_words


def _cfg(**overrides) -> PrepareConfig:
    values = dict(
        source="synthetic",
        n_train=600,
        n_val=100,
        n_test=50,
        frac_positive=0.4,
        frac_negative=0.4,
        tokenizer_vocab_size=500,
        dataset_path=None,
        dataset_name=None,
        data_files=None,
        dataset_split="train",
        prompt_column="prompt",
        completion_column="completion",
        prompt_words=8,
        messages_column=None,
        completion_words=None,
        answer_column=None,
        frac_wrong=0.0,
    )
    values.update(overrides)
    return PrepareConfig(**values)


def test_filler_words_carry_no_sentiment():
    assert [w for w in grammar_words() if lexicon_valence(w) is not None] == []


def test_sentiment_words_are_graded_and_signed():
    assert all(lexicon_valence(w) > 0 for w in POSITIVE_ADJECTIVES)
    assert all(lexicon_valence(w) < 0 for w in NEGATIVE_ADJECTIVES)
    assert gold_score("The acting was not bad.") > 0  # negation flips, as the grammar relies on


def test_classes_are_balanced_and_agree_with_the_judge():
    reviews = generate_reviews(1000, random.Random(3), frac_positive=0.4, frac_negative=0.4)
    golds = [r.gold for r in reviews]
    assert sum(g > 0.05 for g in golds) == 400
    assert sum(g < -0.05 for g in golds) == 400
    assert sum(g == 0.0 for g in golds) == 200
    assert abs(statistics.fmean(golds)) < 0.1
    assert all(gold_score(r.completion) == r.gold for r in reviews[:50])


def test_same_seed_same_data_and_splits_disjoint_by_prompt():
    first, second = synthetic_splits(_cfg(), 7, None), synthetic_splits(_cfg(), 7, None)
    for name in ("train", "val", "test"):
        assert first[name].equals(second[name])
    assert len(first["train"]) == 600 and len(first["val"]) == 100 and len(first["test"]) == 50
    train, val, test = (set(first[n]["prompt"]) for n in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(val) == 100 and len(test) == 50
    assert not synthetic_splits(_cfg(), 8, None)["train"].equals(first["train"])
