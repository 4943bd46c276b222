"""Tokenised rows, collators and the data module shared by every training stage.

Rows are tokenised once, before training, never in the loop. Batches are padded only to their own longest row,
and the training sampler groups rows of similar length (shuffle, take windows of 50 batches, sort each window by
length, cut into batches, shuffle the batches) so little compute goes to padding. Under several processes each rank
takes its share of the same batches (`LengthGroupedBatchSampler`'s `rank` and `world_size`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from pipeline.data.schemas import PREFERENCE_PAIRS, read_table
from pipeline.data.tokenization import encode


@dataclass(frozen=True)
class PromptCompletion:
    """One tokenised row: prompt tokens, then completion tokens (EOS is appended by the collator)."""

    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids) + 1


def tokenize_rows(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    source: str,
    on_invalid: str = "fail",
) -> list[PromptCompletion]:
    """Encode prompt/completion pairs. Rows longer than `max_length` (with EOS) or with an empty completion are an
    error naming them, or, with `on_invalid="drop"`, left out (the caller counts them)."""
    rows = [
        PromptCompletion(p, c) for p, c in zip(encode(tokenizer, prompts), encode(tokenizer, completions), strict=True)
    ]
    too_long = [i for i, row in enumerate(rows) if len(row) > max_length]
    empty = [i for i, row in enumerate(rows) if not row.completion_ids]
    if on_invalid == "drop":
        bad = set(too_long) | set(empty)
        return [row for i, row in enumerate(rows) if i not in bad]
    if too_long:
        shown = ", ".join(map(str, too_long[:10]))
        raise ValueError(
            f"{source}: {len(too_long)} row(s) exceed max_length={max_length} tokens (rows {shown}); "
            "raise the stage's max_length (and model.n_positions), shorten the data, or set sft.on_invalid: drop"
        )
    if empty:
        raise ValueError(f"{source}: rows {empty[:10]} have an empty completion after tokenisation")
    return rows


def pad_right(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Stack sequences into (B, T_max), padding on the right with `value`."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def response_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    ends: Sequence[bool],
    *,
    eos_id: int,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Prompt + response (+ EOS where `ends`), right-padded: the one layout every stage trains and scores on.

    Returns `input_ids`, `attention_mask` (1 on real tokens) and `loss_mask` (1 on response and EOS tokens: the
    prompt is context, not a target), each of shape (B, T).
    """
    ids = [[*p, *r, *([eos_id] if e else [])] for p, r, e in zip(prompt_ids, response_ids, ends, strict=True)]
    masks = [[0] * len(p) + [1] * (len(s) - len(p)) for p, s in zip(prompt_ids, ids, strict=True)]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "loss_mask": pad_right(masks, 0),
    }


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (shortest first), for no-grad scoring with little padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class SFTCollator:
    """Batches `PromptCompletion` rows as prompt + completion + EOS, right-padded.

    Returns `input_ids`, `attention_mask` (1 on real tokens) and `loss_mask` (1 on completion and EOS tokens:
    the prompt is context, not a target), each of shape (B, T).
    """

    pad_id: int
    eos_id: int
    packing: bool = False
    """Lay the batch out padding-free (`packed_batch`): fewer, fuller rows."""

    def __call__(self, rows: Sequence[PromptCompletion]) -> dict[str, torch.Tensor]:
        prompts, completions = [r.prompt_ids for r in rows], [r.completion_ids for r in rows]
        batch = response_batch(prompts, completions, [True] * len(rows), eos_id=self.eos_id, pad_id=self.pad_id)
        return packed_batch(batch) if self.packing else batch


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices grouped into rows of at most `capacity` tokens, none split.

    A sequence longer than `capacity` gets a row of its own.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if fit is None:
            rows.append([index])
            room.append(capacity - lengths[index])
        else:
            rows[fit].append(index)
            room[fit] -= lengths[index]
    return rows


def tightest_packing(lengths: Sequence[int], widths: Sequence[int] = (1, 2, 4)) -> list[list[int]]:
    """`pack_sequences` at whichever capacity of `widths` times the longest sequence leaves the fewest padding
    slots (rows x widest row; ties: the narrower). Sequences of similar length fill rows of the longest one
    sequence each, with a gap after the shorter ones; wider rows close most of those gaps."""
    longest = max(lengths)

    def slots(rows: list[list[int]]) -> int:
        return len(rows) * max(sum(lengths[i] for i in row) for row in rows)

    return min((pack_sequences(lengths, k * longest) for k in widths), key=slots)


def packed_batch(batch: dict[str, torch.Tensor], capacity: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded batch re-laid padding-free: sequences concatenated into rows of at most `capacity` tokens
    (default: `tightest_packing`), `position_ids` restarting at every sequence, and a block-diagonal causal
    attention mask, (R, 1, L, L) boolean, so no token sees another sequence. Loss masks travel along: a sequence's
    first token is a prompt token, never a target, so nothing is predicted across a boundary.

    Returns `input_ids`, `attention_mask` (4D), `position_ids`, `loss_mask`, `token_mask` (1 on real tokens),
    `sequence_index` (the batch row each token came from, -1 on padding; `per_sequence` sums by it) and
    `last_token` (N,), each sequence's last token as an index into the flattened (R * L) layout.
    """
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = pack_sequences(lengths, capacity) if capacity else tightest_packing(lengths)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.zeros(shape, dtype=batch["input_ids"].dtype)  # padding: any id, it is masked out
    positions, loss_mask = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=batch["loss_mask"].dtype)
    segments = torch.zeros(shape, dtype=torch.long)  # 0: padding; k: the row's k-th sequence
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    last_token = torch.empty(len(lengths), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row, start=1):
            n = lengths[i]
            ids[r, start : start + n] = batch["input_ids"][i, :n]
            loss_mask[r, start + 1 : start + n] = batch["loss_mask"][i, 1:n]  # a first token is never a target
            positions[r, start : start + n] = torch.arange(n)
            segments[r, start : start + n] = k
            sequence_index[r, start : start + n] = i
            last_token[i] = r * width + start + n - 1
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] > 0) & causal
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax row
    return {
        "input_ids": ids,
        "attention_mask": mask[:, None],
        "position_ids": positions,
        "loss_mask": loss_mask,
        "token_mask": (segments > 0).long(),
        "sequence_index": sequence_index,
        "last_token": last_token,
    }


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """Whether `batch` was laid out by `packed_batch` (its attention mask is then the 4D block-diagonal one)."""
    return "sequence_index" in batch


def per_sequence(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sums of next-token `values` per sequence, in the batch's row order, padded or packed alike.

    Args:
        values: aligned with `input_ids[:, 1:]` (masked already: padding and prompt tokens hold 0). Shape: (R, L - 1).
        batch: a right-padded batch (R sequences) or a `packed_batch` (N sequences in R rows).

    Returns:
        Shape: (R,) padded, (N,) packed.
    """
    if not is_packed(batch):
        return values.sum(-1)
    index = batch["sequence_index"][:, 1:].clamp(min=0)  # padding holds 0 in `values`: adds nothing to sequence 0
    sums = values.new_zeros(batch["last_token"].numel())
    return sums.index_add(0, index.reshape(-1), values.reshape(-1))


class LengthGroupedBatchSampler(Sampler[list]):
    """Shuffled batches of similar-length rows; a new, seeded order every epoch.

    With `accumulate` > 1 the groups are effective batches of `batch_size * accumulate` rows, each yielded as
    `accumulate` consecutive micro-batches, so accumulation sees exactly the rows one large batch would. With
    `weight` given, every index comes tagged with its group's total weight, `(index, total)`, so a loss can be
    normalised over the whole effective batch (SFT: its target tokens) instead of per micro-batch.

    Under several processes (`world_size` > 1) every rank draws the same order and takes its share of each group
    (rank r every `world_size`-th row of the length-sorted group), so a group is one optimizer step across the ranks,
    each rank yields as many micro-batches as the others, and a position in the order (`epoch`, `skip`) means the
    same on every rank: that is what a resumed stage restores. The order is first padded to a multiple of
    `world_size` with its own first rows, as PyTorch's `DistributedSampler` pads. One process: the order as it was.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        window: int = 50,
        accumulate: int = 1,
        weights: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.lengths, self.batch_size, self.seed, self.window = list(lengths), batch_size, seed, window
        self.accumulate, self.weights = accumulate, weights
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def __iter__(self) -> Iterator[list]:
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        skip, self.skip = self.skip, 0  # a resumed epoch leaves out the micro-batches it already trained on
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order += (order * self.world_size)[: -len(order) % self.world_size]  # every rank gets as many rows
        group = self.batch_size * self.accumulate * self.world_size
        groups = []
        for start in range(0, len(order), group * self.window):
            chunk = sorted(order[start : start + group * self.window], key=self.lengths.__getitem__)
            groups += [chunk[i : i + group] for i in range(0, len(chunk), group)]
        rng.shuffle(groups)
        micro = 0
        for rows in groups:
            rows = rows[self.rank :: self.world_size]  # this rank's share of the step
            if self.weights is not None:
                total = sum(self.weights[i] for i in rows)
                rows = [(i, total) for i in rows]
            for start in range(0, len(rows), self.batch_size):
                micro += 1
                if micro > skip:
                    yield rows[start : start + self.batch_size]

    def __len__(self) -> int:
        rows = -(-len(self.lengths) // self.world_size)
        return -(-rows // self.batch_size)


@dataclass(frozen=True)
class PreferencePair:
    """One tokenised pair sharing a prompt; golds are NaN when unknown (human data)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_gold: float = float("nan")
    rejected_gold: float = float("nan")
    index: int = 0
    reference_chosen_logps: float = float("nan")
    reference_rejected_logps: float = float("nan")

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids)) + 1


def tokenize_pairs(tokenizer, frame, max_length: int, source: str) -> list[PreferencePair]:
    """Encode a preference-pairs table (prompt, chosen, rejected[, golds]) once; over-long rows are an error."""
    prompts = encode(tokenizer, frame["prompt"].tolist())
    chosen = encode(tokenizer, frame["chosen"].tolist())
    rejected = encode(tokenizer, frame["rejected"].tolist())
    nan = [float("nan")] * len(frame)
    golds_c = frame["chosen_gold"].tolist() if "chosen_gold" in frame else nan
    golds_r = frame["rejected_gold"].tolist() if "rejected_gold" in frame else nan
    rows = [
        PreferencePair(p, c, r, float(gc), float(gr), i)
        for i, (p, c, r, gc, gr) in enumerate(zip(prompts, chosen, rejected, golds_c, golds_r, strict=True))
    ]
    too_long = [i for i, row in enumerate(rows) if len(row) > max_length]
    if too_long:
        raise ValueError(
            f"{source}: {len(too_long)} pair(s) exceed max_length={max_length} tokens "
            f"(rows {', '.join(map(str, too_long[:10]))}); raise the stage's max_length"
        )
    return rows


def read_pairs(pairs_dir: str, split: str, tokenizer, max_length: int) -> list[PreferencePair]:
    """The `preferences` stage's table of one split, validated and tokenised (reward, reference and dpo read it)."""
    source = f"{pairs_dir}/{split}.parquet"
    return tokenize_pairs(tokenizer, read_table(source, PREFERENCE_PAIRS), max_length, source)


@dataclass(frozen=True)
class PairCollator:
    """Batches pairs for one concatenated forward pass: rows [0, B) are chosen, rows [B, 2B) rejected.

    Returns `input_ids`, `attention_mask`, `loss_mask` (1 on response and EOS tokens), each (2B, T), plus
    `gold` (2B,), cached `reference_logps` (2B,; NaN when not attached) and `index` (B,), the pair's row in its
    table. Packed: the `packed_batch` layout of the same 2B sequences in that order.
    """

    pad_id: int
    eos_id: int
    packing: bool = False
    """Lay the 2B sequences out padding-free (`packed_batch`): `per_sequence` and `last_token` then find them."""

    def __call__(self, rows: Sequence[PreferencePair]) -> dict[str, torch.Tensor]:
        responses = [r.chosen_ids for r in rows] + [r.rejected_ids for r in rows]
        prompts = [r.prompt_ids for r in rows] * 2
        batch = response_batch(prompts, responses, [True] * len(prompts), eos_id=self.eos_id, pad_id=self.pad_id)
        if self.packing:
            batch = packed_batch(batch)
        return {
            **batch,
            "gold": torch.tensor([r.chosen_gold for r in rows] + [r.rejected_gold for r in rows]),
            "reference_logps": torch.tensor(
                [r.reference_chosen_logps for r in rows] + [r.reference_rejected_logps for r in rows]
            ),
            "index": torch.tensor([r.index for r in rows]),
        }
