"""DVC stage `prepare`: prompt/completion splits and, for a scratch model, the BPE tokenizer."""

from __future__ import annotations

import statistics

from pipeline.data.chat import use_chat_template
from pipeline.data.tokenization import encode, load_tokenizer, train_bpe_tokenizer
from pipeline.files import atomic_path, write_parquet
from pipeline.models.judges import build_judge
from pipeline.tasks.prepare import SPLITS, prepare_splits, summarize_splits
from stages.common import finish, inference_device, stage

PATHS = {"data_dir": "data/prepared", "tokenizer_dir": "models/tokenizer", "report": "reports/prepare.json"}


def main() -> None:
    with stage("prepare", PATHS) as ctx:
        cfg, args = ctx.config, ctx.args
        tokenizer = None
        if cfg.model.base != "scratch":
            tokenizer = load_tokenizer(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code)
            use_chat_template(tokenizer, cfg.model.chat_template)
        splits = prepare_splits(cfg.prepare, cfg.seed, build_judge(cfg.judge).to(inference_device()), tokenizer)
        train = splits["train"]
        if tokenizer is None:
            texts = (train["prompt"] + train["completion"]).tolist()
            tokenizer = train_bpe_tokenizer(texts, cfg.prepare.tokenizer_vocab_size)
        with atomic_path(args.data_dir) as tmp:
            tmp.mkdir()
            for name in SPLITS:
                write_parquet(splits[name], tmp / f"{name}.parquet")
        with atomic_path(args.tokenizer_dir) as tmp:
            tokenizer.save_pretrained(tmp)

        metrics = summarize_splits(splits)
        metrics["tokenizer/vocab_size"] = len(tokenizer)
        metrics["train/prompt_tokens_mean"] = statistics.fmean(map(len, encode(tokenizer, train["prompt"].tolist())))
        metrics["train/completion_tokens_mean"] = statistics.fmean(
            map(len, encode(tokenizer, train["completion"].tolist()))
        )
        ctx.run.log_table(splits["train"].head(20), "samples/train_head.json")
        finish(ctx, metrics, args.report, [args.data_dir, args.tokenizer_dir])
        print(f"prepare: {metrics}")


if __name__ == "__main__":
    main()
