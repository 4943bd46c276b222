"""`sft`: completion-only fine-tuning of the base model on the prepared train split, then samples on val prompts."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Config
from pipeline.data.batches import tokenize_rows
from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.methods.outcome import Outcome
from pipeline.models.build import build_causal_lm, prepare_for_training
from pipeline.models.generation import SamplingParams, check_room, sample
from pipeline.models.lora import merged, parameter_counts
from pipeline.train.hooks import NO_HOOKS, Hooks
from pipeline.train.sft import fit_sft


def run_sft(cfg: Config, *, data_dir: str, tokenizer_dir: str, hooks: Hooks = NO_HOOKS) -> Outcome | None:
    """Train on `data_dir`'s train split, validate on val. None on DDP ranks > 0 (rank 0 writes)."""
    sft = cfg.sft
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code)
    frames = {s: read_table(f"{data_dir}/{s}.parquet", PROMPT_COMPLETION) for s in ("train", "val")}
    rows = {
        s: tokenize_rows(
            tokenizer,
            f["prompt"].tolist(),
            f["completion"].tolist(),
            sft.max_length,
            f"{data_dir}/{s}.parquet",
            on_invalid=sft.on_invalid,
        )
        for s, f in frames.items()
    }
    model = prepare_for_training(
        build_causal_lm(cfg.model, tokenizer),
        cfg.model,
        cfg.trainer,
        disable_dropout=sft.disable_dropout,
        task="CAUSAL_LM",
    )
    prompts = frames["val"]["prompt"].head(sft.n_samples).tolist()
    sampling = SamplingParams(sft.max_new_tokens, 1.0, 0, 1.0, key="sft.max_new_tokens")
    check_room(model, tokenizer, prompts, sampling)  # before training, not after it
    counts = parameter_counts(model)
    module, result = fit_sft(
        model,
        tokenizer,
        rows["train"],
        rows["val"],
        sft,
        cfg.trainer,
        seed=cfg.seed,
        hooks=hooks,
    )
    if not result.is_global_zero:
        return None
    model = merged(module.model)  # what is saved is what samples
    samples = sample(model, tokenizer, prompts, sampling, batch_size=64, seed=cfg.seed)
    table = pd.DataFrame({"prompt": prompts, "completion": samples.texts, "ended": samples.ended})
    metrics = {**result.metrics, **counts}
    metrics.update({f"data/dropped_rows_{s}": float(len(frames[s]) - len(rows[s])) for s in rows})
    metrics["samples/eos_rate"] = sum(samples.ended) / max(len(samples.ended), 1)
    metrics["samples/stopped_by_context"] = float(sum(samples.stopped_by_context))
    return Outcome(metrics, result.step, model, tokenizer, result.history, {"samples/sft_val_samples.json": table})
