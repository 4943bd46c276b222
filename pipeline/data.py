"""The `prepare` stage's logic: prompt/completion splits from the embedded grammar or from a dataset.

Train, val and test are disjoint *by prompt*: a prompt seen in training never reappears in validation or in the
held-out test prompts that evaluation samples from. With `source: dataset`, rows come from
`datasets.load_dataset` (a hub id, or a builder such as `json`/`parquet` with local `data_files`) through a column
mapping; when there is no completion column the text is split after `prompt_words` words, as the DPO paper's IMDb
task uses review prefixes as prompts.
"""

from __future__ import annotations

import random
import statistics

import pandas as pd

from pipeline.config import PrepareConfig
from pipeline.hub import load_table, require_columns
from pipeline.judges import gold_scores
from pipeline.schemas import PROMPT_COMPLETION, validate_frame
from pipeline.synthetic import class_fractions, generate_reviews

SPLITS = ("train", "val", "test")


def synthetic_splits(cfg: PrepareConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Draw the embedded task's reviews; held-out prompts are unique and never used in train."""
    rng = random.Random(seed)
    fractions = {"frac_positive": cfg.frac_positive, "frac_negative": cfg.frac_negative}
    held_out = generate_reviews(cfg.n_val + cfg.n_test, rng, unique_prompts=True, **fractions)
    reserved = frozenset(review.prompt for review in held_out)
    train = generate_reviews(cfg.n_train, rng, exclude_prompts=reserved, **fractions)
    rows = {"train": train, "val": held_out[: cfg.n_val], "test": held_out[cfg.n_val :]}
    return {name: pd.DataFrame([vars(r) for r in reviews]) for name, reviews in rows.items()}


def dataset_splits(cfg: PrepareConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Read a dataset through the column mapping and split it by prompt."""
    key = "prepare.dataset_path"
    table = load_table(cfg.dataset_path, cfg.dataset_name, cfg.data_files, cfg.dataset_split, key)
    frame = _map_columns(table, cfg)
    prompts = sorted(frame["prompt"].unique())
    random.Random(seed).shuffle(prompts)
    if len(prompts) <= cfg.n_val + cfg.n_test:
        raise ValueError(
            f"prepare: the dataset has {len(prompts)} distinct prompts, not more than n_val + n_test = "
            f"{cfg.n_val + cfg.n_test}; lower prepare.n_val/prepare.n_test or use a larger split"
        )
    test_prompts = set(prompts[: cfg.n_test])
    val_prompts = set(prompts[cfg.n_test : cfg.n_test + cfg.n_val])
    splits = {
        "test": frame[frame["prompt"].isin(test_prompts)].drop_duplicates("prompt"),
        "val": frame[frame["prompt"].isin(val_prompts)].drop_duplicates("prompt"),
        "train": frame[~frame["prompt"].isin(test_prompts | val_prompts)],
    }
    splits["train"] = splits["train"].sample(frac=1.0, random_state=seed).head(cfg.n_train)
    for name, split in splits.items():
        split = split.reset_index(drop=True)
        splits[name] = split.assign(gold=gold_scores(split["completion"].tolist()))
    return splits


def _map_columns(table: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    wanted = {"prepare.prompt_column": cfg.prompt_column}
    if cfg.completion_column is not None:
        wanted["prepare.completion_column"] = cfg.completion_column
    require_columns(table, wanted, str(cfg.dataset_path))
    if cfg.completion_column is not None:
        return pd.DataFrame({"prompt": table[cfg.prompt_column], "completion": table[cfg.completion_column]})
    words = table[cfg.prompt_column].astype(str).str.split()
    return pd.DataFrame(
        {
            "prompt": words.str[: cfg.prompt_words].str.join(" "),
            "completion": " " + words.str[cfg.prompt_words :].str.join(" "),
        }
    )


def prepare_splits(cfg: PrepareConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Build and validate the three splits."""
    build = synthetic_splits if cfg.source == "synthetic" else dataset_splits
    splits = build(cfg, seed)
    source = f"prepare ({cfg.source} {cfg.dataset_path or 'grammar'})"
    return {name: validate_frame(splits[name], PROMPT_COMPLETION, f"{source}, {name} split") for name in SPLITS}


def summarize_splits(splits: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Row counts, the gold-score balance of the SFT data and the class shares, for reports/prepare.json."""
    train_gold = splits["train"]["gold"].dropna().tolist()
    summary: dict[str, float] = {f"rows/{name}": len(frame) for name, frame in splits.items()}
    summary["train/gold_mean"] = statistics.fmean(train_gold) if train_gold else float("nan")
    summary["train/gold_std"] = statistics.pstdev(train_gold) if train_gold else float("nan")
    summary.update({f"train/frac_{k}": v for k, v in class_fractions(train_gold).items()})
    return summary
