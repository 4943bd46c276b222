"""The frozen reference's log-probs over preference pairs: `reference_logps` runs it once over every pair, with
exactly the tokenisation and collation DPO trains with, so the `reference` stage caches the result;
`attach_reference` gives the pairs their cached values."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader

from pipeline.data.batches import PairCollator, PreferencePair, per_sequence
from pipeline.models.logprobs import model_token_logps


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected, each (B,), from one forward pass over the 2B sequences
    (padded, or packed: `PairCollator(packing=True)`)."""
    logps, _ = model_token_logps(
        model, batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids")
    )
    return per_sequence(logps * batch["loss_mask"][:, 1:], batch).chunk(2)


def pair_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored (response + EOS) tokens of chosen and rejected, each (B,)."""
    return per_sequence(batch["loss_mask"][:, 1:], batch).chunk(2)


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, rows: Sequence[PreferencePair], collate: PairCollator, batch_size: int
) -> pd.DataFrame:
    """The reference's chosen/rejected log-probs for every pair, in row order (`index` = the row)."""
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    loader = DataLoader([rows[i] for i in order], batch_size=batch_size, collate_fn=collate)
    chosen, rejected, index = [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        c, r = pair_logps(model, batch)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
        index.append(batch["index"].cpu())
    frame = pd.DataFrame(
        {
            "index": torch.cat(index).numpy().astype("int64"),
            "reference_chosen_logps": torch.cat(chosen).double().numpy(),
            "reference_rejected_logps": torch.cat(rejected).double().numpy(),
        }
    )
    return frame.sort_values("index").reset_index(drop=True)


def attach_reference(rows: Sequence[PreferencePair], cached: pd.DataFrame, source: str) -> list[PreferencePair]:
    """Give each pair its cached reference log-probs; the cache must cover exactly these rows."""
    if len(cached) != len(rows) or cached["index"].tolist() != list(range(len(rows))):
        raise ValueError(
            f"{source}: cached reference log-probs cover {len(cached)} rows but the pairs table has {len(rows)}; "
            "rerun the reference stage (dvc repro reference)"
        )
    return [
        dataclasses.replace(row, reference_chosen_logps=float(c), reference_rejected_logps=float(r))
        for row, c, r in zip(rows, cached["reference_chosen_logps"], cached["reference_rejected_logps"], strict=True)
    ]
