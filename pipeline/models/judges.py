"""Gold judges: what scores a (prompt, response) pair as the ground truth the pipeline aligns towards.

A judge labels simulated preference pairs and scores every policy; the reward model only ever learns from it. One
small interface, `Judge.score(prompts, responses) -> list[float]`, chosen by the `judge` params section
(`build_judge`) and handed to every place that computes a gold score:

- `vader`: VADER's compound sentiment of the response, in [-1, 1] (a lexicon and rule model, so offline and
  deterministic). The embedded task plays the DPO paper's controlled-sentiment experiment with it; text with no
  sentiment words scores exactly 0. `judge.penalize_repetition` scales it by the share of distinct word bigrams.
- `classifier`: any Hugging Face sequence classifier (`lvwerra/distilbert-imdb`, as in TRL's sentiment example and
  the DPO paper's IMDb setting); the score is the log-odds or the probability of `judge.label`.
- `reward_model`: a one-logit sequence classifier, e.g. a reward model this pipeline trained or
  `OpenAssistant/reward-model-deberta-v3-large-v2`, on the (prompt, response) text pair.
- `verifier`: a verifiable reward (`pipeline.models.verifiers`): the response's final answer checked against the
  prompt's reference answer, which the stage hands over with `VerifierJudge.with_answers`.

Model judges use their own tokenizer on the decoded texts (they rarely share the policy's vocabulary), run without
gradients on the device they are moved to, and take one forward pass per batch of rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Protocol

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from pipeline.config import JudgeConfig
from pipeline.data.batches import length_sorted_batches, pad_right
from pipeline.models.verifiers import Verifier, lookup_answers


class Judge(Protocol):
    """Scores (prompt, response) pairs; higher is better."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...

    def to(self, device: torch.device | str) -> Judge: ...


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


def distinct_bigram_share(text: str) -> float:
    """The share of distinct word bigrams among a text's bigrams (lower-cased words, punctuation dropped); 1 for a
    text of fewer than two words."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    bigrams = list(zip(words, words[1:], strict=False))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


class VaderJudge:
    """VADER's compound score of the response (the prompt is context, not judged); with `penalize_repetition`, times
    the response's share of distinct word bigrams, so repeating a word (a lexicon's cheapest praise) earns nothing."""

    def __init__(self, penalize_repetition: bool = False) -> None:
        self.penalize_repetition = penalize_repetition

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores = gold_scores(responses)
        if not self.penalize_repetition:
            return scores
        return [score * distinct_bigram_share(text) for score, text in zip(scores, responses, strict=True)]

    def to(self, device: torch.device | str) -> VaderJudge:
        return self


def label_scores(logits: torch.Tensor, label: int, kind: str) -> torch.Tensor:
    """A classifier's score of one label: its log-odds, log p / (1 - p), or its probability p.

    Args:
        logits: Shape: (B, L), L >= 2 labels.

    Returns:
        Shape: (B,).
    """
    logits = logits.float()
    if kind == "probability":
        return torch.softmax(logits, -1)[:, label]
    others = torch.cat([logits[:, :label], logits[:, label + 1 :]], dim=1)  # (B, L-1)
    return logits[:, label] - torch.logsumexp(others, -1)


class _ModelJudge:
    """Shared by the model-backed judges: a frozen classifier, its tokenizer, batching and device."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: JudgeConfig) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if model.config.pad_token_id is None:  # batched sequence classifiers find the last token through pad
            model.config.pad_token_id = self.pad_id

    def to(self, device: torch.device | str) -> _ModelJudge:
        self.model.to(device)
        return self

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def read(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        ids = self.encode(list(prompts), list(responses))
        device = next(self.model.parameters()).device
        out = torch.empty(len(ids))
        for index in length_sorted_batches([len(row) for row in ids], self.cfg.batch_size):
            input_ids = pad_right([ids[i] for i in index], self.pad_id)
            attention_mask = pad_right([[1] * len(ids[i]) for i in index], 0)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            out[torch.tensor(index)] = self.read(logits).float().cpu()
        return out.tolist()


class ClassifierJudge(_ModelJudge):
    """A sequence classifier's score of `judge.label` on the response (or prompt + response)."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: JudgeConfig) -> None:
        super().__init__(model, tokenizer, cfg)
        labels = {str(name): int(i) for i, name in model.config.id2label.items()}
        if model.config.num_labels < 2 or cfg.label not in labels:
            raise ValueError(
                f"judge.label: {cfg.label!r} is not a label of classifier {cfg.path!r}; its labels are "
                f"{', '.join(labels)}. Set judge.label to one of them (a one-logit model is judge.kind: reward_model)"
            )
        self.label = labels[cfg.label]

    def encode(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        texts = [p + r for p, r in zip(prompts, responses, strict=True)] if self.cfg.include_prompt else responses
        return self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)["input_ids"]

    def read(self, logits: torch.Tensor) -> torch.Tensor:
        return label_scores(logits, self.label, self.cfg.score)


class RewardModelJudge(_ModelJudge):
    """A one-logit reward model on the (prompt, response) text pair, with its tokenizer's own special tokens.

    A decoder-style tokenizer adds none, so the EOS is appended (that is where this pipeline's reward models, and
    most decoder reward models, read their score); an encoder's `[CLS] prompt [SEP] response [SEP]` is kept.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: JudgeConfig) -> None:
        super().__init__(model, tokenizer, cfg)
        if model.config.num_labels != 1:
            raise ValueError(
                f"judge.path: {cfg.path!r} has {model.config.num_labels} labels; a reward_model judge has exactly "
                "one logit (for a classifier set judge.kind: classifier and judge.label)"
            )

    def encode(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        ids = tok(prompts, responses, truncation=True, max_length=self.cfg.max_length - 1)["input_ids"]
        ends = {tok.eos_token_id, tok.sep_token_id} - {None}
        if tok.eos_token_id is None:
            return ids
        return [row if row and row[-1] in ends else [*row, tok.eos_token_id] for row in ids]

    def read(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0]


class VerifierJudge:
    """Scores each response 1 when its final answer checks against the prompt's reference answer, else 0 (plus
    the format reward, if any). Answers are looked up by prompt text: give them with `with_answers` first."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.answers: dict[str, str] = {}
        self.last_correct: list[float] = []

    def with_answers(self, answers: Mapping[str, str]) -> VerifierJudge:
        self.answers.update(answers)
        return self

    @property
    def timeouts(self) -> int:
        """Checks that ran past `judge.timeout_s` so far (each scored 0)."""
        return self.verifier.timeouts

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Correctness (0 or 1, or the user's function's score) plus the format reward; `last_correct` keeps the
        correctness part of the last call."""
        answers = lookup_answers(self.answers, prompts)
        self.last_correct = [self.verifier.check(p, r, a) for p, r, a in zip(prompts, responses, answers, strict=True)]
        return self.verifier.with_format(self.last_correct, responses)

    def to(self, device: torch.device | str) -> VerifierJudge:
        return self


_MODEL_JUDGES = {"classifier": ClassifierJudge, "reward_model": RewardModelJudge}


def build_judge(cfg: JudgeConfig) -> Judge:
    """The judge `cfg` names, on the CPU (move it with `.to(device)`). A verifier's worker runs in this process's
    directory (the project root, from where `python:` verifiers are imported)."""
    if cfg.kind == "vader":
        return VaderJudge(cfg.penalize_repetition)
    if cfg.kind == "verifier":
        return VerifierJudge(Verifier(cfg.verifier, cfg.timeout_s, cfg.format_pattern, cfg.format_weight))
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            cfg.path, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
        )
    except OSError as error:
        raise FileNotFoundError(
            f"judge.path: cannot load {cfg.path!r} as a sequence-classification model ({error}); give a hub id or "
            "a save_pretrained directory"
        ) from None
    return _MODEL_JUDGES[cfg.kind](model, tokenizer, cfg)
