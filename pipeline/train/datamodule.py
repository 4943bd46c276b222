"""The Lightning datamodule every training stage serves its pre-tokenised rows through (kept apart from
`pipeline.data.batches`, so the stages that train nothing never import Lightning).

It shards the data across processes itself (the Trainer's `use_distributed_sampler` is off): training batches come
from one `LengthGroupedBatchSampler` order that every rank shares, so a resumed multi-process stage restarts every
rank at the same place in it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.data.batches import LengthGroupedBatchSampler


class _Tagged(torch.utils.data.Dataset):
    """Rows looked up by `(index, group total)` keys: yields `(row, total)`."""

    def __init__(self, rows: Sequence) -> None:
        self.rows = rows

    def __getitem__(self, key: tuple[int, int]) -> tuple[object, int]:
        return self.rows[key[0]], key[1]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class _TaggedCollate:
    """Collates `(row, total)` items and adds the group total as `group_weight` (a scalar tensor)."""

    collate: Callable

    def __call__(self, items: Sequence[tuple[object, int]]) -> dict[str, torch.Tensor]:
        return {**self.collate([row for row, _ in items]), "group_weight": torch.tensor(float(items[0][1]))}


class RowsDataModule(pl.LightningDataModule):
    """Serves pre-tokenised train/val rows through a collator, with length-grouped training batches.

    `accumulate` groups micro-batches into effective batches (`LengthGroupedBatchSampler`); `weight`, if given,
    tags each training batch with its effective batch's total weight (`group_weight`).
    """

    def __init__(
        self,
        train_rows: Sequence,
        val_rows: Sequence,
        collate: Callable,
        batch_size: int,
        seed: int,
        length: Callable[[object], int] = len,
        accumulate: int = 1,
        weight: Callable[[object], int] | None = None,
    ) -> None:
        super().__init__()
        self.train_rows, self.val_rows, self.collate = list(train_rows), list(val_rows), collate
        self.batch_size, self.seed, self.length = batch_size, seed, length
        self.accumulate, self.weight = accumulate, weight
        self._resume: tuple[int, int] | None = None

    def resume_from(self, epoch: int, consumed: int) -> None:
        """Restart the training order at `epoch`, after its first `consumed` micro-batches (a resumed stage)."""
        self._resume = (epoch, consumed)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        weights = [self.weight(r) for r in self.train_rows] if self.weight and self.accumulate > 1 else None
        sampler = LengthGroupedBatchSampler(
            [self.length(r) for r in self.train_rows],
            self.batch_size,
            self.seed,
            accumulate=self.accumulate,
            weights=weights,
            rank=rank,
            world_size=world_size,
        )
        if self._resume is not None:
            sampler.epoch, sampler.skip = self._resume
            self._resume = None
        # An own generator: creating an iterator then never draws from the global RNG (dropout's), so a resumed
        # run's random stream matches an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        if weights is None:
            return DataLoader(self.train_rows, batch_sampler=sampler, collate_fn=self.collate, generator=generator)
        return DataLoader(
            _Tagged(self.train_rows),
            batch_sampler=sampler,
            collate_fn=_TaggedCollate(self.collate),
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader:
        order = sorted(range(len(self.val_rows)), key=lambda i: self.length(self.val_rows[i]))
        rows = [self.val_rows[i] for i in order]
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:  # what Lightning's own sampler did: each rank a
            # strided share, padded with the first rows so that every rank runs as many (collective) steps
            sampler = DistributedSampler(
                rows, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(
            rows,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.seed),
        )
