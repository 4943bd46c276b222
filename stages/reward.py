"""DVC stage `reward`: a Bradley-Terry reward model initialised from the SFT model with a fresh score head."""

from __future__ import annotations

from pipeline.eval.reports import write_curve
from pipeline.methods.reward import run_reward
from pipeline.models.build import save_model
from stages.common import finish, run_main, stage

PATHS = {
    "pairs_dir": "data/preferences",
    "sft_dir": "models/sft",
    "model_dir": "models/reward",
    "report": "reports/reward.json",
    "curve": "reports/plots/reward.csv",
}


def main() -> None:
    with stage("reward", PATHS, inputs=("pairs_dir", "sft_dir")) as ctx:
        args = ctx.args
        out = run_reward(ctx.config, pairs_dir=args.pairs_dir, sft_dir=args.sft_dir, hooks=ctx.hooks())
        if out is None:  # a DDP rank > 0: rank 0 writes
            return
        save_model(out.model, out.tokenizer, args.model_dir)
        out.stats.write(args.model_dir)
        write_curve(out.history, args.curve)
        finish(ctx, out, args.report, [args.model_dir])


if __name__ == "__main__":
    run_main(main)
