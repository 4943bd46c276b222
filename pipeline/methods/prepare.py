"""`prepare`: the prompt/completion splits and, for a scratch model, the BPE tokenizer trained on them."""

from __future__ import annotations

import statistics

from pipeline.config import Config
from pipeline.data.chat import use_chat_template
from pipeline.data.tokenization import encode, load_tokenizer, train_bpe_tokenizer
from pipeline.methods.outcome import Outcome
from pipeline.models.build import inference_device
from pipeline.models.judges import build_judge
from pipeline.tasks.prepare import prepare_splits, summarize_splits
from pipeline.tasks.tools import SPECIAL_TOKENS


def run_prepare(cfg: Config) -> Outcome:
    """The splits (`Outcome.splits`), the tokenizer (a hub model's, with its chat template, or a new BPE one)."""
    tokenizer = None
    if cfg.model.base != "scratch":
        tokenizer = load_tokenizer(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code)
        use_chat_template(tokenizer, cfg.model.chat_template)
    splits = prepare_splits(cfg.prepare, cfg.seed, build_judge(cfg.judge).to(inference_device()), tokenizer)
    train = splits["train"]
    if tokenizer is None:
        texts = (train["prompt"] + train["completion"]).tolist()
        special = SPECIAL_TOKENS if cfg.prepare.source == "calculator" else ()  # the tool's tags: one token each
        tokenizer = train_bpe_tokenizer(texts, cfg.prepare.tokenizer_vocab_size, special)
    metrics = summarize_splits(splits)
    metrics["tokenizer/vocab_size"] = len(tokenizer)
    for column in ("prompt", "completion"):
        metrics[f"train/{column}_tokens_mean"] = statistics.fmean(map(len, encode(tokenizer, train[column].tolist())))
    return Outcome(metrics, tokenizer=tokenizer, splits=splits, tables={"samples/train_head.json": train.head(20)})
