"""DVC stage `sft`: completion-only fine-tuning of the base model on the prepared train split."""

from __future__ import annotations

import pandas as pd

from pipeline.data.batches import tokenize_rows
from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.eval.reports import write_curve
from pipeline.models.build import build_causal_lm, prepare_for_training, save_model
from pipeline.models.generation import SamplingParams, check_room, sample
from pipeline.models.lora import parameter_counts
from pipeline.train.sft import fit_sft
from stages.common import finish, stage

PATHS = {
    "data_dir": "data/prepared",
    "tokenizer_dir": "models/tokenizer",
    "model_dir": "models/sft",
    "report": "reports/sft.json",
    "curve": "reports/plots/sft_loss.csv",
}


def main() -> None:
    with stage("sft", PATHS, inputs=("data_dir", "tokenizer_dir")) as ctx:
        cfg, sft, args = ctx.config, ctx.config.sft, ctx.args
        tokenizer = load_tokenizer(args.tokenizer_dir, trust_remote_code=cfg.model.trust_remote_code)
        frames = {s: read_table(f"{args.data_dir}/{s}.parquet", PROMPT_COMPLETION) for s in ("train", "val")}
        rows = {
            s: tokenize_rows(tokenizer, f["prompt"].tolist(), f["completion"].tolist(), sft.max_length,
                             f"{args.data_dir}/{s}.parquet", on_invalid=sft.on_invalid)
            for s, f in frames.items()
        }  # fmt: skip
        dropped = {f"data/dropped_rows_{s}": float(len(frames[s]) - len(rows[s])) for s in rows}
        model = prepare_for_training(build_causal_lm(cfg.model, tokenizer), cfg.model, cfg.trainer,
                                     disable_dropout=sft.disable_dropout, task="CAUSAL_LM")  # fmt: skip
        prompts = frames["val"]["prompt"].head(sft.n_samples).tolist()
        sampling = SamplingParams(sft.max_new_tokens, 1.0, 0, 1.0, key="sft.max_new_tokens")
        check_room(model, tokenizer, prompts, sampling)  # before training, not after it
        counts = parameter_counts(model)
        module, result = fit_sft(model, tokenizer, rows["train"], rows["val"], sft, cfg.trainer, seed=cfg.seed,
                                 logger=ctx.run.lightning_logger(), resume=ctx.resume_callback,
                                 ckpt_path=ctx.resume_from)  # fmt: skip
        if not result.is_global_zero:
            return
        model = save_model(module.model, tokenizer, args.model_dir)
        samples = sample(model, tokenizer, prompts, sampling, batch_size=64, seed=cfg.seed)
        table = pd.DataFrame({"prompt": prompts, "completion": samples.texts, "ended": samples.ended})
        ctx.run.log_table(table, "samples/sft_val_samples.json")
        write_curve(result.history, args.curve)
        metrics = result.metrics
        metrics.update({**counts, **dropped})
        metrics["samples/eos_rate"] = sum(samples.ended) / max(len(samples.ended), 1)
        metrics["samples/stopped_by_context"] = float(sum(samples.stopped_by_context))
        finish(ctx, metrics, args.report, [args.model_dir], step=result.step)
        print(table.head(5).to_string())
        print(f"sft: {metrics}")


if __name__ == "__main__":
    main()
