"""DVC stage `sft`: completion-only fine-tuning of the base model on the prepared train split."""

from __future__ import annotations

from pipeline.eval.reports import write_curve
from pipeline.methods.sft import run_sft
from pipeline.models.build import save_model
from stages.common import finish, run_main, stage

PATHS = {
    "data_dir": "data/prepared",
    "tokenizer_dir": "models/tokenizer",
    "model_dir": "models/sft",
    "report": "reports/sft.json",
    "curve": "reports/plots/sft_loss.csv",
}


def main() -> None:
    with stage("sft", PATHS, inputs=("data_dir", "tokenizer_dir")) as ctx:
        args = ctx.args
        out = run_sft(ctx.config, data_dir=args.data_dir, tokenizer_dir=args.tokenizer_dir, hooks=ctx.hooks())
        if out is None:  # a DDP rank > 0: rank 0 writes
            return
        save_model(out.model, out.tokenizer, args.model_dir)
        write_curve(out.history, args.curve)
        finish(ctx, out, args.report, [args.model_dir])


if __name__ == "__main__":
    run_main(main)
