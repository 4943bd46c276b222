"""DVC stage `dpo`: Direct Preference Optimization of the SFT policy against cached reference log-probs."""

from __future__ import annotations

from pipeline.eval.reports import write_curve
from pipeline.methods.dpo import run_dpo
from pipeline.models.build import save_model
from stages.common import finish, run_main, stage

PATHS = {
    "pairs_dir": "data/preferences",
    "reference_dir": "data/reference",
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "reward_dir": "models/reward",
    "model_dir": "models/dpo",
    "report": "reports/dpo.json",
    "curve": "reports/plots/dpo.csv",
}


def main() -> None:
    with stage("dpo", PATHS, inputs=("pairs_dir", "reference_dir", "data_dir", "sft_dir", "reward_dir")) as ctx:
        args = ctx.args
        out = run_dpo(
            ctx.config,
            pairs_dir=args.pairs_dir,
            reference_dir=args.reference_dir,
            data_dir=args.data_dir,
            sft_dir=args.sft_dir,
            reward_dir=args.reward_dir,
            hooks=ctx.hooks(),
        )
        if out is None:  # a DDP rank > 0: rank 0 writes
            return
        save_model(out.model, out.tokenizer, args.model_dir)
        write_curve(out.history, args.curve)
        finish(ctx, out, args.report, [args.model_dir])


if __name__ == "__main__":
    run_main(main)
