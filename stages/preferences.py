"""DVC stage `preferences`: preference pairs from SFT samples and the simulated annotator, or from a dataset."""

from __future__ import annotations

import time

from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.files import atomic_path, write_parquet
from pipeline.models.build import build_causal_lm
from pipeline.models.judges import build_judge
from pipeline.tasks.preferences import checked_pairs, dataset_pairs, generate_pairs
from stages.common import finish, inference_device, stage

PATHS = {
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "out_dir": "data/preferences",
    "report": "reports/preferences.json",
}


def main() -> None:
    with stage("preferences", PATHS, inputs=("data_dir", "sft_dir")) as ctx:
        cfg, prefs, args = ctx.config, ctx.config.preferences, ctx.args
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        if prefs.mode == "generate":
            model = build_causal_lm(cfg.model, tokenizer, path=args.sft_dir).to(inference_device())
            judge = build_judge(cfg.judge).to(inference_device())
            splits = {}
            for offset, (name, count) in enumerate((("train", prefs.train_prompts), ("val", prefs.val_prompts))):
                prompts = read_table(f"{args.data_dir}/{name}.parquet", PROMPT_COMPLETION)["prompt"].unique()
                splits[name], stats = generate_pairs(
                    model, tokenizer, list(prompts[:count]), prefs, judge, seed=cfg.seed + offset,
                    compiled=cfg.generation.compile,
                )
                metrics.update({f"{name}/{key}": value for key, value in stats.items()})
        else:
            splits = dataset_pairs(prefs, cfg.seed, tokenizer)
        metrics["perf/wall_s"] = time.perf_counter() - start
        held_out = frozenset(read_table(f"{args.data_dir}/test.parquet", PROMPT_COMPLETION)["prompt"])
        with atomic_path(args.out_dir) as tmp:
            tmp.mkdir()
            for name, frame in splits.items():
                kept, counts = checked_pairs(frame, tokenizer, prefs, name, held_out)
                write_parquet(kept, tmp / f"{name}.parquet")
                metrics.update({f"{name}/{key}": value for key, value in counts.items()})
                ctx.run.log_table(kept.head(30), f"samples/{name}_pairs.json")
        finish(ctx, metrics, args.report, [args.out_dir])
        print(f"preferences: {metrics}")


if __name__ == "__main__":
    main()
