"""Unpaired feedback for KTO: rows of (prompt, response, desirable or not), each with a mismatched response for
KTO's KL estimate, and the collator that lays them out as DPO's pairs are.

The pairs the `preferences` stage labelled are made unpaired by the rule `unpair` states: each chosen response is a
desirable row, each rejected one an undesirable row, and `desirable_fraction` keeps only that share of the desirable
rows (a 1:10 imbalance is 0.1). A dataset in TRL's unpaired format (prompt, completion, boolean label) is read by
`read_unpaired`, every row checked before any is used. Every row also carries a response from a row of another
prompt, scored after this row's prompt: KTO's reference point z0 is the policy's KL to the reference estimated on
such mismatched pairs (Ethayarajh et al. 2024, section 4.1), as TRL's KTO trainer does.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.batches import PreferencePair, packed_batch, response_batch
from pipeline.data.chat import is_conversation, parse_turns, render_completion, render_prompt
from pipeline.data.loading import require_columns
from pipeline.data.tokenization import encode


@dataclass(frozen=True)
class UnpairedRow:
    """One tokenised row: a response to its prompt labelled desirable or not, and another prompt's response (the KL
    estimate's mismatched pair). Reference log-probs are NaN until attached."""

    prompt_ids: list[int]
    response_ids: list[int]
    kl_response_ids: list[int]
    desirable: bool
    index: int
    reference_logps: float = math.nan
    reference_kl_logps: float = math.nan

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.response_ids), len(self.kl_response_ids)) + 1


def unpair(pairs: Sequence[PreferencePair], desirable_fraction: float, seed: int) -> list[UnpairedRow]:
    """The pairs' responses as unpaired rows, the reference log-probs the pairs carry attached to their responses.

    Each pair gives an undesirable row (its rejected response) and, for a `desirable_fraction` share of the pairs
    drawn with `seed`, a desirable row (its chosen response); rows keep the pairs' order, desirable before
    undesirable. Mismatched responses: `with_partners`.
    """
    rng = np.random.default_rng(seed)
    kept = round(desirable_fraction * len(pairs))
    desirable = set(rng.permutation(len(pairs))[:kept].tolist())
    rows: list[Labelled] = []
    for i, pair in enumerate(pairs):
        if i in desirable:
            rows.append(Labelled(pair.prompt_ids, pair.chosen_ids, True, pair.reference_chosen_logps))
        rows.append(Labelled(pair.prompt_ids, pair.rejected_ids, False, pair.reference_rejected_logps))
    return with_partners(rows, rng)


@dataclass(frozen=True)
class Labelled:
    prompt_ids: list[int]
    response_ids: list[int]
    desirable: bool
    reference_logps: float = math.nan


def with_partners(rows: Sequence[Labelled], rng: np.random.Generator) -> list[UnpairedRow]:
    """Each row with its mismatched response: the response of the next row, in an order drawn from `rng`, whose
    prompt differs; the mismatched reference log-probs are NaN (`with_kl_reference` attaches them).

    Raises:
        ValueError: when every row shares one prompt (no mismatched pair exists).
    """
    if len({tuple(row.prompt_ids) for row in rows}) < 2:
        raise ValueError("dpo.loss kto: every row has the same prompt, so KTO's KL estimate has no mismatched pair")
    order = rng.permutation(len(rows)).tolist()
    partner = {}
    for position, row in enumerate(order):
        step = 1
        while rows[order[(position + step) % len(order)]].prompt_ids == rows[row].prompt_ids:
            step += 1
        partner[row] = order[(position + step) % len(order)]
    return [
        UnpairedRow(
            row.prompt_ids, row.response_ids, rows[partner[i]].response_ids, row.desirable, i, row.reference_logps
        )
        for i, row in enumerate(rows)
    ]


def read_unpaired(table: pd.DataFrame, tokenizer, source: str) -> pd.DataFrame:
    """(prompt, completion, label) texts from a table in TRL's unpaired format (`trl-lib/kto-mix-14k`): `prompt` and
    `completion` as text, or as lists of turns (rendered with the chat template: the prompt with its generation
    prompt, the completion's assistant content), and a boolean `label` (true: desirable).

    Raises:
        ValueError: naming the file, row and column, for a missing column, a cell that is not text or turns, a label
            that is not a boolean, or a table whose rows all carry one label (KTO needs both).
    """
    require_columns(table, {f"dpo.kto_dataset ({c})": c for c in ("prompt", "completion", "label")}, source)
    for row, value in enumerate(table["label"]):
        if not isinstance(value, bool | np.bool_):
            raise ValueError(
                f"{source} row {row} column 'label': {value!r} is not a boolean; TRL's unpaired format labels each "
                "completion true (desirable) or false (undesirable): fix the row or drop it"
            )
    labels = table["label"].astype(bool)
    if labels.all() or not labels.any():
        raise ValueError(
            f"{source} column 'label': all {len(table)} rows are {bool(labels.iloc[0])}; KTO learns from desirable "
            "and undesirable rows both: add rows of the other label"
        )
    prompts, completions = [], []
    for row, (prompt, completion) in enumerate(zip(table["prompt"], table["completion"], strict=True)):
        where = {column: f"{source} row {row} column {column!r}" for column in ("prompt", "completion")}
        for column, value in (("prompt", prompt), ("completion", completion)):
            if not (isinstance(value, str) or is_conversation(value)):
                raise ValueError(
                    f"{where[column]}: {value!r} is neither text nor a list of turns; fix the row or drop it"
                )
        turns = parse_turns(prompt, where["prompt"]) if is_conversation(prompt) else prompt
        prompts.append(render_prompt(tokenizer, turns))
        if is_conversation(completion):
            reply = parse_turns(completion, where["completion"])
            if reply[-1]["role"] != "assistant":
                raise ValueError(f"{where['completion']}: the last turn is {reply[-1]['role']!r}, not the assistant's")
            completions.append(render_completion(tokenizer, reply[-1]["content"], conversational=True))
        else:
            completions.append(completion)
    return pd.DataFrame({"prompt": prompts, "completion": completions, "label": labels.to_numpy()})


def check_json_labels(files: str) -> None:
    """Every row of local JSON-lines (or JSON array) files has a JSON boolean `label`: `datasets` would silently
    read the string "true" as true, so this runs on the files before it does. Raises naming the file and line."""
    for name in sorted(glob.glob(files)) or [files]:
        text = Path(name).read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            found = [(f"element {i}", row) for i, row in enumerate(json.loads(text))]
        else:
            found = [(f"line {n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for where, row in found:
            if isinstance(row, dict) and "label" in row and not isinstance(row["label"], bool):
                raise ValueError(
                    f"{name} {where} column 'label': {json.dumps(row['label'])} is not a boolean; TRL's unpaired "
                    "format labels each completion true (desirable) or false (undesirable): fix the row or drop it"
                )


def dataset_rows(frame: pd.DataFrame, tokenizer, max_length: int, source: str, seed: int) -> list[UnpairedRow]:
    """`read_unpaired`'s rows tokenised, with their mismatched responses (`with_partners`); reference log-probs
    still to attach. Over-long rows are an error naming them."""
    prompts = encode(tokenizer, frame["prompt"].tolist())
    responses = encode(tokenizer, frame["completion"].tolist())
    too_long = [i for i, (p, r) in enumerate(zip(prompts, responses, strict=True)) if len(p) + len(r) + 1 > max_length]
    if too_long:
        raise ValueError(
            f"{source}: {len(too_long)} row(s) exceed dpo.max_length={max_length} tokens "
            f"(rows {', '.join(map(str, too_long[:10]))}); raise dpo.max_length"
        )
    rows = [Labelled(p, r, bool(label)) for p, r, label in zip(prompts, responses, frame["label"], strict=True)]
    return with_partners(rows, np.random.default_rng(seed))


def with_kl_reference(
    rows: Sequence[UnpairedRow], reference_kl_logps: Sequence[float], reference_logps: Sequence[float] | None = None
) -> list[UnpairedRow]:
    """`rows` with the reference's log-probs of their mismatched responses (and of their own responses, when given:
    a dataset's rows are in no cache), row for row."""
    own = reference_logps if reference_logps is not None else [r.reference_logps for r in rows]
    return [
        dataclasses.replace(row, reference_logps=float(mine), reference_kl_logps=float(kl))
        for row, mine, kl in zip(rows, own, reference_kl_logps, strict=True)
    ]


def as_kl_pairs(rows: Sequence[UnpairedRow]) -> list[PreferencePair]:
    """Each row as a pair (response, mismatched response), to score both with the reference pass
    (`pipeline.models.reference.reference_logps`) the `reference` stage runs over pairs."""
    return [PreferencePair(r.prompt_ids, r.response_ids, r.kl_response_ids, index=r.index) for r in rows]


@dataclass(frozen=True)
class UnpairedCollator:
    """Batches unpaired rows for one forward pass, laid out as `PairCollator`'s pairs: rows [0, B) are the
    responses, rows [B, 2B) the mismatched responses (so `pair_logps` scores both).

    Returns `input_ids`, `attention_mask`, `loss_mask`, each (2B, T) (or packed), `desirable` (B,) bool,
    `reference_logps` (2B,: the responses', then the mismatched ones') and `index` (B,).
    """

    pad_id: int
    eos_id: int
    packing: bool = False

    def __call__(self, rows: Sequence[UnpairedRow]) -> dict[str, torch.Tensor]:
        responses = [r.response_ids for r in rows] + [r.kl_response_ids for r in rows]
        prompts = [r.prompt_ids for r in rows] * 2
        batch = response_batch(prompts, responses, [True] * len(prompts), eos_id=self.eos_id, pad_id=self.pad_id)
        if self.packing:
            batch = packed_batch(batch)
        return {
            **batch,
            "desirable": torch.tensor([r.desirable for r in rows]),
            "reference_logps": torch.tensor([r.reference_logps for r in rows] + [r.reference_kl_logps for r in rows]),
            "index": torch.tensor([r.index for r in rows]),
        }
