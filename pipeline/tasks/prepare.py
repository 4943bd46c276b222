"""The `prepare` stage's logic: prompt/completion splits from the embedded grammar or from a dataset.

Train, val and test are disjoint *by prompt*: a prompt seen in training never reappears in validation or in the
held-out test prompts that evaluation samples from. With `source: dataset`, rows come from
`datasets.load_dataset` (a hub id, or a builder such as `json`/`parquet` with local `data_files`) through a column
mapping; when there is no completion column the text is split after `prompt_words` words, as the DPO paper's IMDb
task uses review prefixes as prompts. With `messages_column`, each row is a conversation (`pipeline.data.chat`): the
prompt is every turn before the last assistant turn, rendered with the tokenizer's chat template when it has one; a
conversation with tool calls gives a row per assistant turn (`turn`), all in the split of its first.
The `gold` column is the judge's score of each completion.
"""

from __future__ import annotations

import random
import statistics

import pandas as pd
from transformers import PreTrainedTokenizerBase

from pipeline.config import PrepareConfig
from pipeline.data.chat import conversation_rows, render_prompt
from pipeline.data.loading import load_table, require_columns, require_text
from pipeline.data.schemas import PROMPT_COMPLETION, validate_frame
from pipeline.envs.dialogue import dialogue_for
from pipeline.models.judges import Judge, VerifierJudge
from pipeline.tasks.arithmetic import arithmetic_splits
from pipeline.tasks.synthetic import class_fractions, generate_reviews
from pipeline.tasks.tools import calculator_splits, guess_splits

SPLITS = ("train", "val", "test")
# The embedded tasks with reference answers: `prepare.source` -> (n_train, n_val, n_test, frac_wrong, seed) -> splits
EMBEDDED_VERIFIABLE = {"arithmetic": arithmetic_splits}
# ... and those played in an environment, their demonstrations written through its dialogue (a last argument)
EMBEDDED_ENVIRONMENTS = {"calculator": calculator_splits, "guess": guess_splits}


def synthetic_splits(
    cfg: PrepareConfig, seed: int, tokenizer: PreTrainedTokenizerBase | None
) -> dict[str, pd.DataFrame]:
    """Draw the embedded task's reviews; held-out prompts are unique and never used in train."""
    rng = random.Random(seed)
    fractions = {"frac_positive": cfg.frac_positive, "frac_negative": cfg.frac_negative}
    held_out = generate_reviews(cfg.n_val + cfg.n_test, rng, unique_prompts=True, **fractions)
    reserved = frozenset(review.prompt for review in held_out)
    train = generate_reviews(cfg.n_train, rng, exclude_prompts=reserved, **fractions)
    rows = {"train": train, "val": held_out[: cfg.n_val], "test": held_out[cfg.n_val :]}
    splits = {name: pd.DataFrame([vars(r) for r in reviews]) for name, reviews in rows.items()}
    if tokenizer is not None:  # a hub model on the embedded task: prompts in its chat template, if it has one
        splits = {name: _render_prompts(split, tokenizer) for name, split in splits.items()}
    return splits


def dataset_splits(cfg: PrepareConfig, seed: int, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, pd.DataFrame]:
    """Read a dataset through the column mapping (or its conversations) and split it by prompt."""
    key = "prepare.dataset_path"
    table = load_table(cfg.dataset_path, cfg.dataset_name, cfg.data_files, cfg.dataset_split, key)
    if cfg.messages_column is not None:
        require_columns(table, {"prepare.messages_column": cfg.messages_column}, str(cfg.dataset_path))
        if tokenizer is None:
            raise ValueError("prepare.messages_column: conversations need a hub or local model.base, not scratch")
        where = f"{cfg.data_files or cfg.dataset_path} column {cfg.messages_column!r}"
        tools = table["tools"].tolist() if "tools" in table else None
        frame = pd.DataFrame(conversation_rows(table[cfg.messages_column].tolist(), tokenizer, where, tools))
        # a conversation's rows stay in one split, under the prompt of its first row
        frame["group"] = frame.groupby("conversation")["prompt"].transform("first")
        frame = frame.drop(columns="conversation" if frame["turn"].max() > 0 else ["conversation", "turn"])
    else:
        frame = _map_columns(table, cfg)
        frame = _render_prompts(frame, tokenizer) if tokenizer is not None else frame
        frame["group"] = frame["prompt"]
    prompts = sorted(frame["group"].unique())
    random.Random(seed).shuffle(prompts)
    if len(prompts) <= cfg.n_val + cfg.n_test:
        raise ValueError(
            f"prepare: the dataset has {len(prompts)} distinct prompts, not more than n_val + n_test = "
            f"{cfg.n_val + cfg.n_test}; lower prepare.n_val/prepare.n_test or use a larger split"
        )
    test_prompts = set(prompts[: cfg.n_test])
    val_prompts = set(prompts[cfg.n_test : cfg.n_test + cfg.n_val])
    firsts = frame[frame["turn"] == 0] if "turn" in frame else frame  # test: where episodes start
    splits = {
        "test": firsts[firsts["group"].isin(test_prompts)].drop_duplicates("prompt"),
        "val": frame[frame["group"].isin(val_prompts)].drop_duplicates("prompt"),
        "train": frame[~frame["group"].isin(test_prompts | val_prompts)],
    }
    splits["train"] = splits["train"].sample(frac=1.0, random_state=seed).head(cfg.n_train)
    return {name: split.drop(columns="group").reset_index(drop=True) for name, split in splits.items()}


def _render_prompts(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerBase) -> pd.DataFrame:
    return frame.assign(prompt=[render_prompt(tokenizer, prompt) for prompt in frame["prompt"]])


def _map_columns(table: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    wanted = {"prepare.prompt_column": cfg.prompt_column}
    if cfg.completion_column is not None:
        wanted["prepare.completion_column"] = cfg.completion_column
    if cfg.answer_column is not None:
        wanted["prepare.answer_column"] = cfg.answer_column
    require_columns(table, wanted, str(cfg.dataset_path))
    keys_of: dict[str, list[str]] = {}  # a column may serve two keys (GSM8K's `answer`: completion and answer)
    for key, column in wanted.items():
        keys_of.setdefault(column, []).append(key)
    for column, keys in keys_of.items():
        require_text(table, column, ", ".join(keys), str(cfg.data_files or cfg.dataset_path))
    answers = {} if cfg.answer_column is None else {"answer": table[cfg.answer_column]}
    if cfg.completion_column is not None:
        return pd.DataFrame({"prompt": table[cfg.prompt_column], "completion": table[cfg.completion_column], **answers})
    words = table[cfg.prompt_column].astype(str).str.split()
    end = None if cfg.completion_words is None else cfg.prompt_words + cfg.completion_words
    return pd.DataFrame(
        {
            "prompt": words.str[: cfg.prompt_words].str.join(" "),
            "completion": " " + words.str[cfg.prompt_words : end].str.join(" "),
            **answers,
        }
    )


def prepare_splits(
    cfg: PrepareConfig, seed: int, judge: Judge, tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[str, pd.DataFrame]:
    """Build the three splits, score each completion with the judge, and validate them.

    Args:
        tokenizer: the model's tokenizer, whose chat template (if any) renders the prompts; None for a scratch
            model, whose tokenizer is trained on these splits afterwards.
    """
    if cfg.source in EMBEDDED_ENVIRONMENTS:  # turns written through the dialogue the environment will speak
        draw = EMBEDDED_ENVIRONMENTS[cfg.source]
        splits = draw(cfg.n_train, cfg.n_val, cfg.n_test, cfg.frac_wrong, seed, dialogue_for(tokenizer))
    elif cfg.source in EMBEDDED_VERIFIABLE:
        splits = EMBEDDED_VERIFIABLE[cfg.source](cfg.n_train, cfg.n_val, cfg.n_test, cfg.frac_wrong, seed)
        splits = {name: _render_prompts(split, tokenizer) for name, split in splits.items()} if tokenizer else splits
    else:
        splits = (synthetic_splits if cfg.source == "synthetic" else dataset_splits)(cfg, seed, tokenizer)
    if isinstance(judge, VerifierJudge):  # a verifier checks each completion against its row's answer
        for split in splits.values():
            judge.with_answers(dict(zip(split["prompt"], split["answer"], strict=True)))
    splits = {
        name: split.assign(gold=judge.score(split["prompt"].tolist(), split["completion"].tolist()))
        for name, split in splits.items()
    }
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
