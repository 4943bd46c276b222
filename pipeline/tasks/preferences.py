"""Preference pairs: the simulated annotator, pair formation, human datasets, and the screening of bad rows.

On the embedded task the "human" is a Bradley-Terry annotator over the gold judge: it prefers response a over b
with probability sigmoid((gold_a - gold_b) / tau), so small gold gaps give noisy labels and tau = 0 gives the
gold order exactly (the DPO paper's controlled setting uses a sentiment classifier the same way). A biased
annotator (`bias_pattern`, `bias_weight`) adds a fixed amount to the score it compares for each match of a pattern
the gold judge ignores: a proxy that pays for something besides quality, which PPO can learn to exploit
(docs/monitor.md). On a dataset,
human pairs are read through a column mapping, in any of the formats `read_dataset_pairs` detects: plain
prompt/chosen/rejected strings, Anthropic-HH whole dialogues, and TRL's conversational format (turn lists, with the
prompt in its own column or implicit in chosen/rejected). Conversational prompts are rendered with the tokenizer's
chat template when it has one.

Every pair then goes through `screen_pairs`, a table of named checks (identical, empty, repeating the prompt,
containing EOS, over-long). Each check's count is reported; `on_invalid` decides whether bad rows are dropped
or stop the stage with an error naming them.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from pipeline.config import PreferencesConfig
from pipeline.data.chat import (
    Turns,
    has_template,
    hh_turns,
    is_conversation,
    parse_turns,
    render_completion,
    render_prompt,
    split_last_assistant,
)
from pipeline.data.loading import load_table, require_columns
from pipeline.data.schemas import PREFERENCE_PAIRS, validate_frame
from pipeline.data.tokenization import encode
from pipeline.envs.episodes import EpisodeSpec, episode_stats, run_episodes
from pipeline.models.generation import SamplingParams, sample
from pipeline.models.judges import Judge

ASSISTANT_TURN = "\n\nAssistant:"


def preference_probability(gold_a: np.ndarray, gold_b: np.ndarray, tau: float) -> np.ndarray:
    """P(a preferred over b) under the Bradley-Terry annotator; tau = 0 is the gold order (ties 0.5).

    Args:
        gold_a: Shape: (N,).
        gold_b: Shape: (N,).
    """
    gap = np.asarray(gold_a, dtype=float) - np.asarray(gold_b, dtype=float)
    if tau == 0:
        return np.where(gap > 0, 1.0, np.where(gap < 0, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-gap / tau))


def expected_flip_rate(gold_gaps: np.ndarray, tau: float) -> float:
    """Closed form: the mean probability that the annotator prefers the lower-gold response."""
    gaps = np.abs(np.asarray(gold_gaps, dtype=float))
    if tau == 0:
        return 0.0
    return float(np.mean(1.0 / (1.0 + np.exp(gaps / tau))))


def annotator_bias(texts: Sequence[str], pattern: str | None, weight: float) -> list[float]:
    """What a biased annotator adds to each response's score: `weight` per match of `pattern` (0 without one)."""
    if pattern is None or weight == 0:
        return [0.0] * len(texts)
    compiled = re.compile(pattern)
    return [weight * len(compiled.findall(text)) for text in texts]


def pairs_from_samples(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    golds: Sequence[Sequence[float]],
    *,
    tau: float,
    min_gold_gap: float,
    rng: np.random.Generator,
    biases: Sequence[Sequence[float]] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Label every pair of each prompt's K responses with the annotator.

    The annotator compares gold + bias (the bias 0 unless given); ties and `min_gold_gap` are judged on that score,
    `flip_rate` counts the labels that disagree with the gold order (a bias shows in it) and `flip_rate_expected`
    the annotator's own noise (tau) against the score it compares.

    Args:
        prompts: N prompts.
        responses: N lists of up to K responses.
        golds: gold scores aligned with `responses`.
        biases: what a biased annotator adds to each score (`annotator_bias`), aligned with `responses`.

    Returns:
        The pairs (`prompt`, `chosen`, `rejected`, `chosen_gold`, `rejected_gold`) and label statistics.
    """
    rows, gaps = [], []
    dropped_ties = 0
    if biases is None:
        biases = [[0.0] * len(texts) for texts in responses]
    for prompt, texts, scores, bias in zip(prompts, responses, golds, biases, strict=True):
        seen = [score + extra for score, extra in zip(scores, bias, strict=True)]
        for i, j in itertools.combinations(range(len(texts)), 2):
            if abs(seen[i] - seen[j]) <= min_gold_gap or texts[i] == texts[j]:
                dropped_ties += 1
                continue
            rows.append((prompt, texts[i], texts[j], scores[i], scores[j]))
            gaps.append(seen[i] - seen[j])
    gaps_arr = np.asarray(gaps, dtype=float)
    prefer_first = rng.random(len(rows)) < preference_probability(gaps_arr, np.zeros_like(gaps_arr), tau)
    table = pd.DataFrame(
        [
            (p, a, b, ga, gb) if first else (p, b, a, gb, ga)
            for (p, a, b, ga, gb), first in zip(rows, prefer_first, strict=True)
        ],
        columns=["prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"],
    )
    flipped = (table["chosen_gold"] < table["rejected_gold"]).to_numpy() if len(table) else np.zeros(0, bool)
    gold_gaps = np.asarray([ga - gb for _, _, _, ga, gb in rows], dtype=float)
    stats = {
        "pairs": float(len(table)),
        "dropped_ties": float(dropped_ties),
        "flip_rate": float(flipped.mean()) if len(table) else math.nan,
        "flip_rate_expected": expected_flip_rate(gaps_arr, tau) if len(table) else math.nan,
        "gold_gap_mean": float(np.abs(gold_gaps).mean()) if len(table) else math.nan,
        "gold_gap_p10": float(np.quantile(np.abs(gold_gaps), 0.1)) if len(table) else math.nan,
        "gold_gap_p50": float(np.quantile(np.abs(gold_gaps), 0.5)) if len(table) else math.nan,
        "gold_gap_p90": float(np.quantile(np.abs(gold_gaps), 0.9)) if len(table) else math.nan,
    }
    return table, stats


def split_dialogues(chosen: Sequence[str], rejected: Sequence[str], source: str) -> pd.DataFrame:
    """Split whole dialogues (Anthropic HH) into a shared prompt and the two final assistant responses."""
    rows, bad = [], []
    for index, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
        cut = c.rfind(ASSISTANT_TURN)
        prompt = c[: cut + len(ASSISTANT_TURN)] if cut >= 0 else ""
        if cut < 0 or not r.startswith(prompt):
            bad.append(index)
            continue
        rows.append((prompt, c[len(prompt) :], r[len(prompt) :]))
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} row(s) are not two dialogues sharing everything up to the last "
            f"{ASSISTANT_TURN.strip()!r} turn (rows {', '.join(map(str, bad[:10]))}); "
            "set preferences.prompt_column if the data has a prompt column"
        )
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])


def _pair_checks(
    tokenizer, max_length: int, held_out: frozenset[str], dedupe: bool
) -> dict[str, Callable[[pd.DataFrame], pd.Series]]:
    eos = tokenizer.eos_token

    def too_long(frame: pd.DataFrame) -> pd.Series:
        prompt = np.array([len(ids) for ids in encode(tokenizer, frame["prompt"].tolist())])
        longest = np.maximum(
            [len(ids) for ids in encode(tokenizer, frame["chosen"].tolist())],
            [len(ids) for ids in encode(tokenizer, frame["rejected"].tolist())],
        )
        return pd.Series(prompt + longest + 1 > max_length, index=frame.index)

    def repeats_prompt(frame: pd.DataFrame) -> pd.Series:
        prompt = frame["prompt"].str.strip()
        return pd.Series(
            [
                bool(p) and (c.strip().startswith(p) or r.strip().startswith(p))
                for p, c, r in zip(prompt, frame["chosen"], frame["rejected"], strict=True)
            ],
            index=frame.index,
        )

    return {
        "identical": lambda f: f["chosen"] == f["rejected"],
        "empty_response": lambda f: (f["chosen"].str.strip() == "") | (f["rejected"].str.strip() == ""),
        "repeats_prompt": repeats_prompt,
        "extra_eos": lambda f: (
            f["chosen"].str.contains(eos, regex=False) | f["rejected"].str.contains(eos, regex=False)
        ),
        "too_long": too_long,
        # A pair whose prompt is a held-out evaluation prompt would leak the test set into training.
        "held_out_prompt": lambda f: f["prompt"].isin(held_out),
        **({"duplicate": lambda f: f.duplicated(["prompt", "chosen", "rejected"])} if dedupe else {}),
    }


def screen_pairs(
    frame: pd.DataFrame,
    tokenizer,
    *,
    max_length: int,
    on_invalid: str,
    source: str,
    held_out: frozenset[str] = frozenset(),
    dedupe: bool = False,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Apply every pair check; drop the failing rows or raise naming them, and count each check's failures.

    Args:
        held_out: prompts reserved for evaluation (the prepared test split): a pair with one is invalid.
        dedupe: also flag repeats of an earlier (prompt, chosen, rejected) row (human datasets; sampled pairs may
            legitimately repeat, each a separate annotator draw).
    """
    counts: dict[str, float] = {}
    bad = pd.Series(False, index=frame.index)
    messages = []
    for name, check in _pair_checks(tokenizer, max_length, held_out, dedupe).items():
        failing = check(frame).astype(bool) & ~bad if len(frame) else bad
        counts[f"invalid/{name}"] = float(failing.sum())
        if failing.any():
            rows = ", ".join(map(str, frame.index[failing][:10]))
            messages.append(f"  {name}: {int(failing.sum())} row(s) (rows {rows})")
        bad |= failing
    if messages and on_invalid == "fail":
        raise ValueError(
            f"{source}: invalid preference pairs (max_length={max_length}):\n"
            + "\n".join(messages)
            + "\nfix the data, or set preferences.on_invalid: drop to drop them"
        )
    return frame[~bad].reset_index(drop=True), counts


def checked_pairs(
    frame: pd.DataFrame, tokenizer, cfg: PreferencesConfig, split: str, held_out: frozenset[str]
) -> tuple[pd.DataFrame, dict[str, float]]:
    """One split's pairs as the stage writes them: screened (`screen_pairs`, by `cfg.on_invalid`), validated against
    the `PREFERENCE_PAIRS` schema, and never empty; with their counts (`invalid/*`, `pairs_written`)."""
    kept, counts = screen_pairs(
        frame,
        tokenizer,
        max_length=cfg.max_length,
        on_invalid=cfg.on_invalid,
        source=f"preferences {split} pairs",
        held_out=held_out,
        dedupe=cfg.mode == "dataset",
    )
    if kept.empty:  # before validation, whose dtype checks an empty table fails less clearly
        raise ValueError(
            f"preferences: no valid {split} pairs were left; see the invalid/* counts {counts}. With "
            "generated pairs, all samples of each prompt may have scored the same (a verifier judge on "
            "a model that is never right): train SFT longer, raise preferences.k, or add a format "
            "reward (judge.format_pattern)"
        )
    kept = validate_frame(kept, PREFERENCE_PAIRS, f"preferences {split} pairs")
    return kept, {**counts, "pairs_written": float(len(kept))}


def generate_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    cfg: PreferencesConfig,
    judge: Judge,
    *,
    seed: int,
    compiled: bool = False,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Sample `cfg.k` completions per prompt, score them with the gold judge and label pairs.

    Completions that hit `max_new_tokens` before EOS are paired like the others (the reward model sees them
    with the EOS its collator appends); their share is reported as `samples/eos_rate`, and the count of those the
    model's context cut short as `samples/stopped_by_context`. `compiled`: see
    `SamplingParams.compiled`.
    """
    params = SamplingParams(
        cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, compiled, key="preferences.max_new_tokens"
    )
    repeated = [p for p in prompts for _ in range(cfg.k)]
    samples = sample(model, tokenizer, repeated, params, batch_size=cfg.batch_size, seed=seed)
    golds = judge.score(repeated, samples.texts)
    table, stats = _labelled(list(prompts), repeated, samples.texts, golds, cfg, seed)
    stats["samples/eos_rate"] = float(np.mean(samples.ended))
    stats["samples/stopped_by_context"] = float(sum(samples.stopped_by_context))
    stats["samples/tokens_mean"] = float(np.mean([len(c) for c in samples.completion_ids]))
    return table, stats


def episode_pairs(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    cfg: PreferencesConfig,
    judge: Judge,
    spec: EpisodeSpec,
    *,
    seed: int,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Pairs of first turns, each judged by the episode it starts: `cfg.k` episodes per row in the environment
    (`spec`), the policy playing on after its first turn; an episode scores `env.reward_weight` x the environment's
    reward + the gold judge's score of its final policy turn. The pair's prompt is the
    first observation and its responses the first turns' text, so DPO and the reward model train on the policy's own
    tokens only, never on a tool's result; a first turn that calls a tool is worth what the episode after it earned.
    `cfg.max_new_tokens` does not apply: a turn's budget is `env.turn_tokens`."""
    params = SamplingParams(spec.budgets.turn_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    repeated_rows = [row for row in rows for _ in range(cfg.k)]
    episodes = run_episodes(
        model,
        tokenizer,
        spec.make_env,
        repeated_rows,
        spec.budgets,
        params,
        seed=seed,
        batch_size=cfg.batch_size,
        tool_stops=spec.tool_stops,
        timeout_s=spec.timeout_s,
        kind=spec.kind,
    )
    repeated = [e.transcript[0][1] for e in episodes]
    firsts = [e.transcript[1][1] for e in episodes]
    finals = [next(text for role, text in reversed(e.transcript) if role == "policy") for e in episodes]
    judged = judge.score(repeated, finals)
    golds = [spec.reward_weight * e.reward + score for e, score in zip(episodes, judged, strict=True)]
    table, stats = _labelled(list(dict.fromkeys(repeated)), repeated, firsts, golds, cfg, seed)
    stats.update({f"samples/{key}": value for key, value in episode_stats(episodes).items()})
    stats["samples/tokens_mean"] = float(np.mean([len(encode(tokenizer, [text])[0]) for text in firsts]))
    return table, stats


def _labelled(
    prompts: list[str],
    repeated: Sequence[str],
    texts: Sequence[str],
    golds: Sequence[float],
    cfg: PreferencesConfig,
    seed: int,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The annotator's pairs among each prompt's responses (`repeated[i]` is `texts[i]`'s prompt)."""
    extras = annotator_bias(texts, cfg.bias_pattern, cfg.bias_weight)
    responses: dict[str, list[str]] = {p: [] for p in prompts}
    scores: dict[str, list[float]] = {p: [] for p in prompts}
    biases: dict[str, list[float]] = {p: [] for p in prompts}
    for prompt, text, gold, extra in zip(repeated, texts, golds, extras, strict=True):
        responses[prompt].append(text)
        scores[prompt].append(gold)
        biases[prompt].append(extra)
    rng = np.random.default_rng(seed)
    table, stats = pairs_from_samples(
        prompts,
        list(responses.values()),
        list(scores.values()),
        tau=cfg.tau,
        min_gold_gap=cfg.min_gold_gap,
        rng=rng,
        biases=list(biases.values()),
    )
    if cfg.bias_pattern is not None and cfg.bias_weight != 0:
        stats["samples/bias_mean"] = float(np.mean(extras))
    stats["samples/gold_mean"] = float(np.mean(golds))
    return table, stats


def dataset_pairs(cfg: PreferencesConfig, seed: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, pd.DataFrame]:
    """Read human preference pairs through the column mapping and split train/val by prompt."""
    table = load_table(
        cfg.dataset_path, cfg.dataset_name, cfg.data_files, cfg.dataset_split, "preferences.dataset_path"
    )
    wanted = {"preferences.chosen_column": cfg.chosen_column, "preferences.rejected_column": cfg.rejected_column}
    if cfg.prompt_column is not None:
        wanted["preferences.prompt_column"] = cfg.prompt_column
    require_columns(table, wanted, str(cfg.dataset_path))
    frame = read_dataset_pairs(table, cfg, tokenizer, str(cfg.data_files or cfg.dataset_path))
    frame = frame.assign(chosen_gold=math.nan, rejected_gold=math.nan)
    prompts = sorted(frame["prompt"].unique())
    np.random.default_rng(seed).shuffle(prompts)
    val_prompts = set(prompts[: max(1, round(len(prompts) * cfg.val_fraction))])
    in_val = frame["prompt"].isin(val_prompts)
    return {"train": frame[~in_val].reset_index(drop=True), "val": frame[in_val].reset_index(drop=True)}


def read_dataset_pairs(
    table: pd.DataFrame, cfg: PreferencesConfig, tokenizer: PreTrainedTokenizerBase, source: str
) -> pd.DataFrame:
    """(prompt, chosen, rejected) texts from a pairs table, in the format its first row shows.

    - prompt column + chosen/rejected strings: used as they are (a prompt is rendered with the chat template);
    - no prompt column, chosen/rejected strings: Anthropic-HH whole dialogues, split at the last assistant turn;
    - chosen/rejected turn lists (TRL's conversational format): the prompt is the `prompt` column (turns or a
      string) followed by any turns before chosen's last assistant turn, or, with no prompt column, the turns
      both conversations share before their last assistant turn; the responses are the last assistant turns.

    A row in another format than the first, a malformed turn, or chosen/rejected that disagree on the prompt is an
    error naming the file, row and column.
    """
    columns = {"chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    if cfg.prompt_column is not None:
        columns = {"prompt": cfg.prompt_column, **columns}
    _require_one_format(table, columns, source)
    conversational = is_conversation(table[cfg.chosen_column].iloc[0]) if len(table) else False
    if not conversational and cfg.prompt_column is not None:
        prompts = [render_prompt(tokenizer, p) for p in table[cfg.prompt_column]]
        return pd.DataFrame(
            {"prompt": prompts, "chosen": table[cfg.chosen_column], "rejected": table[cfg.rejected_column]}
        )
    if not conversational and not has_template(tokenizer):
        return split_dialogues(table[cfg.chosen_column].tolist(), table[cfg.rejected_column].tolist(), source)
    rows = []
    for row, record in enumerate(table[list(columns.values())].itertuples(index=False)):
        values = dict(zip(columns, record, strict=True))
        at = {key: f"{source} row {row} column {column!r}" for key, column in columns.items()}
        read = parse_turns if conversational else hh_turns
        chosen, rejected = read(values["chosen"], at["chosen"]), read(values["rejected"], at["rejected"])
        prompt, chosen_text, rejected_text = _pair_turns(values.get("prompt"), chosen, rejected, at)
        rows.append(
            (
                render_prompt(tokenizer, prompt),
                render_completion(tokenizer, chosen_text, conversational=True),
                render_completion(tokenizer, rejected_text, conversational=True),
            )
        )
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])


def _pair_turns(prompt, chosen: Turns, rejected: Turns, at: dict[str, str]) -> tuple[Turns, str, str]:
    """The shared prompt turns and the two final assistant responses of one conversational pair."""
    split = split_last_assistant if prompt is None else _context
    chosen_context, chosen_text = split(chosen, at["chosen"])
    rejected_context, rejected_text = split(rejected, at["rejected"])
    if chosen_context != rejected_context:
        raise ValueError(
            f"{at['chosen']}: the turns before the last assistant turn differ from {at['rejected']}; a pair must "
            "share its prompt"
        )
    if prompt is None:
        return chosen_context, chosen_text, rejected_text
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else parse_turns(prompt, at["prompt"])
    return head + chosen_context, chosen_text, rejected_text


def _context(turns: Turns, where: str) -> tuple[Turns, str]:
    """Turns before the last assistant turn (possibly none: the prompt column holds the rest) and its content."""
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last turn is {turns[-1]['role']!r}; a response must end with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def _require_one_format(table: pd.DataFrame, columns: dict[str, str], source: str) -> None:
    """Every cell of a column holds text, or every cell holds a list of turns, as the first row does."""
    for key, column in columns.items():
        first = None
        for row, value in enumerate(table[column]):
            if not (isinstance(value, str) or is_conversation(value)):
                raise ValueError(
                    f"{source} row {row} column {column!r}: {value!r} is neither text nor a list of turns; "
                    f"fix the row or drop it (preferences.{key}_column reads this column)"
                )
            kind = "a list of turns" if is_conversation(value) else "text"
            first = first or kind
            if kind != first:
                raise ValueError(
                    f"{source} row {row} column {column!r}: holds {kind} but row 0 holds {first}; a dataset must "
                    "use one format"
                )
    chosen_kind = is_conversation(table[columns["chosen"]].iloc[0]) if len(table) else False
    if len(table) and is_conversation(table[columns["rejected"]].iloc[0]) != chosen_kind:
        raise ValueError(
            f"{source} row 0: column {columns['chosen']!r} and column {columns['rejected']!r} hold different formats "
            "(text and a list of turns); chosen and rejected must match"
        )
