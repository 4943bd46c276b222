"""`reference`: the SFT model's log-probs of every preference pair, computed once so DPO never holds a reference."""

from __future__ import annotations

import time

from pipeline.config import Config
from pipeline.data.batches import PairCollator, read_pairs
from pipeline.data.schemas import REFERENCE_LOGPS, validate_frame
from pipeline.data.tokenization import load_tokenizer
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_causal_lm, frozen, inference_device
from pipeline.models.reference import reference_logps


def run_reference(cfg: Config, *, pairs_dir: str, sft_dir: str) -> Outcome:
    """One frame per split (`Outcome.splits`): the pairs' reference log-probs, row for row."""
    ref = cfg.reference
    tokenizer = load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    model = frozen(build_causal_lm(cfg.model, tokenizer, path=sft_dir), inference_device())
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=ref.packing)
    metrics: dict[str, float] = {}
    splits = {}
    for split in ("train", "val"):
        rows = read_pairs(pairs_dir, split, tokenizer, ref.max_length)
        start = time.perf_counter()
        frame = reference_logps(model, rows, collate, ref.batch_size)
        splits[split] = frame = validate_frame(frame, REFERENCE_LOGPS, f"{pairs_dir}/{split}.parquet")
        metrics[f"{split}/wall_s"] = time.perf_counter() - start
        metrics[f"{split}/pairs"] = float(len(frame))
        metrics[f"{split}/reference_chosen_logps"] = float(frame["reference_chosen_logps"].mean())
        metrics[f"{split}/reference_rejected_logps"] = float(frame["reference_rejected_logps"].mean())
    return Outcome(metrics, splits=splits)
