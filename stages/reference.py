"""DVC stage `reference`: the SFT model's log-probs of every preference pair, computed once for DPO."""

from __future__ import annotations

import time

from pipeline.data.batches import PairCollator, read_pairs
from pipeline.data.schemas import REFERENCE_LOGPS, validate_frame
from pipeline.data.tokenization import load_tokenizer
from pipeline.files import atomic_path, write_parquet
from pipeline.models.build import build_causal_lm, frozen
from pipeline.train.dpo import reference_logps
from stages.common import finish, inference_device, stage

PATHS = {
    "pairs_dir": "data/preferences",
    "sft_dir": "models/sft",
    "out_dir": "data/reference",
    "report": "reports/reference.json",
}


def main() -> None:
    with stage("reference", PATHS, inputs=("pairs_dir", "sft_dir")) as ctx:
        cfg, ref, args = ctx.config, ctx.config.reference, ctx.args
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        model = frozen(build_causal_lm(cfg.model, tokenizer, path=args.sft_dir), inference_device())
        collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=ref.packing)
        metrics: dict[str, float] = {}
        with atomic_path(args.out_dir) as tmp:
            tmp.mkdir()
            for split in ("train", "val"):
                source = f"{args.pairs_dir}/{split}.parquet"
                rows = read_pairs(args.pairs_dir, split, tokenizer, ref.max_length)
                start = time.perf_counter()
                frame = validate_frame(reference_logps(model, rows, collate, ref.batch_size), REFERENCE_LOGPS, source)
                metrics[f"{split}/wall_s"] = time.perf_counter() - start
                metrics[f"{split}/pairs"] = float(len(frame))
                metrics[f"{split}/reference_chosen_logps"] = float(frame["reference_chosen_logps"].mean())
                metrics[f"{split}/reference_rejected_logps"] = float(frame["reference_rejected_logps"].mean())
                write_parquet(frame, tmp / f"{split}.parquet")
        finish(ctx, metrics, args.report, [args.out_dir])
        print(f"reference: {metrics}")


if __name__ == "__main__":
    main()
