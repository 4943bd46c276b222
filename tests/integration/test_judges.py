"""One test per judge kind against a hand computation, on local stand-ins saved with `save_pretrained`."""

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.config import ConfigError, load_config, read_params
from pipeline.data.tokenization import load_tokenizer
from pipeline.models.build import build_reward_model, save_model
from pipeline.models.judges import VaderJudge, build_judge, gold_scores, label_scores
from tests.defaults import ROOT, default_section
from tests.standins import encoder_reward_model, gpt2_hub, sentiment_classifier

PROMPTS = ["I saw it on Sunday.", "My review:", "The film runs long."]
RESPONSES = [" The plot was wonderful and moving.", " Awful.", " There is a long scene at the farm, and it is dull."]


def _judge_cfg(**overrides):
    return default_section("judge", batch_size=2, **overrides)


def _logits(path, *texts):
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        return model(**tokenizer(*texts, return_tensors="pt")).logits[0]


def test_vader_judge_scores_the_response_alone():
    assert VaderJudge().score(PROMPTS, RESPONSES) == gold_scores(RESPONSES)
    assert VaderJudge().score(["Terrible awful prompt."] * 3, RESPONSES) == gold_scores(RESPONSES)


def test_vader_judge_penalizing_repetition_scales_by_distinct_bigrams():
    texts = [" truly truly truly truly.", " The acting was great. The plot was good.", " Great."]
    judge = build_judge(_judge_cfg(penalize_repetition=True))
    # 3 bigrams, all (truly, truly): 1 distinct of 3; the review's 7 bigrams are all distinct; one word has none
    expected = [gold_scores(texts)[0] / 3, gold_scores(texts)[1], gold_scores(texts)[2]]
    assert judge.score(PROMPTS, texts) == pytest.approx(expected)
    assert expected[0] < 0.3 < gold_scores(texts)[0]  # the repeated praise VADER loves is worth little
    raw = read_params(ROOT / "params.yaml")
    raw["judge"].update(kind="verifier", penalize_repetition=True)
    with pytest.raises(ConfigError, match=r"judge\.penalize_repetition: applies to judge\.kind vader"):
        load_config(raw)


def test_classifier_judge_is_the_label_log_odds_or_probability(tmp_path):
    path = sentiment_classifier(tmp_path / "distilbert-imdb")
    judge = build_judge(_judge_cfg(kind="classifier", path=path, label="POSITIVE"))
    expected = []
    for response in RESPONSES:
        negative, positive = _logits(path, response).tolist()
        expected.append(positive - negative)  # two labels: log p / (1 - p) is the logit margin
    assert judge.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)  # batches of 2, length-sorted
    probability = build_judge(_judge_cfg(kind="classifier", path=path, label="POSITIVE", score="probability"))
    assert probability.score(PROMPTS, RESPONSES) == pytest.approx([1 / (1 + math.exp(-x)) for x in expected], abs=1e-6)
    with_prompt = build_judge(_judge_cfg(kind="classifier", path=path, label="NEGATIVE", include_prompt=True))
    negative, positive = _logits(path, PROMPTS[0] + RESPONSES[0]).tolist()
    assert with_prompt.score(PROMPTS[:1], RESPONSES[:1]) == pytest.approx([negative - positive], abs=1e-5)


def test_label_scores_match_the_softmax_for_three_labels():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    p = torch.softmax(logits, -1)[0, 1]
    assert label_scores(logits, 1, "probability").item() == pytest.approx(p.item())
    assert label_scores(logits, 1, "log_odds").item() == pytest.approx(math.log(p / (1 - p)), abs=1e-6)


def test_unknown_classifier_label_is_named_with_the_labels_there_are(tmp_path):
    path = sentiment_classifier(tmp_path / "cls")
    with pytest.raises(
        ValueError,
        match=r"judge\.label: 'HAPPY' is not a label of classifier .*; its labels are "
        r"NEGATIVE, POSITIVE",
    ):
        build_judge(_judge_cfg(kind="classifier", path=path, label="HAPPY"))


def test_encoder_reward_model_judge_scores_the_text_pair(tmp_path):
    path = encoder_reward_model(tmp_path / "deberta-like-rm")
    judge = build_judge(_judge_cfg(kind="reward_model", path=path))
    expected = [_logits(path, p, r)[0].item() for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    assert judge.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


def test_pipeline_reward_model_as_judge_reads_at_the_appended_eos(tmp_path, model_cfg):
    hub = gpt2_hub(tmp_path / "gpt2")
    tokenizer = load_tokenizer(hub)
    save_model(
        build_reward_model(dataclasses.replace(model_cfg, base=hub), tokenizer, hub), tokenizer, tmp_path / "reward"
    )
    judge = build_judge(_judge_cfg(kind="reward_model", path=str(tmp_path / "reward")))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward").eval()
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        ids = (
            tokenizer(prompt, add_special_tokens=False)["input_ids"]
            + tokenizer(response, add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id]
        )
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert judge.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


def test_reward_model_judge_needs_one_logit_and_config_names_missing_keys(tmp_path):
    path = sentiment_classifier(tmp_path / "cls")
    with pytest.raises(ValueError, match=r"judge\.path: .* has 2 labels; a reward_model judge has exactly one logit"):
        build_judge(_judge_cfg(kind="reward_model", path=path))
    raw = read_params(ROOT / "params.yaml")
    raw["judge"].update(kind="classifier", path=None, label=None)
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert "judge.path: required for judge.kind 'classifier'" in str(info.value)
    assert "judge.label: required for judge.kind 'classifier'" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"judge\.path: cannot load '.*missing' as a sequence-classification"):
        build_judge(_judge_cfg(kind="reward_model", path=str(tmp_path / "missing")))
