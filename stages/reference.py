"""DVC stage `reference`: the SFT model's log-probs of every preference pair, computed once for DPO."""

from __future__ import annotations

from pipeline.files import write_splits
from pipeline.methods.reference import run_reference
from stages.common import finish, run_main, stage

PATHS = {
    "pairs_dir": "data/preferences",
    "sft_dir": "models/sft",
    "out_dir": "data/reference",
    "report": "reports/reference.json",
}


def main() -> None:
    with stage("reference", PATHS, inputs=("pairs_dir", "sft_dir")) as ctx:
        args = ctx.args
        out = run_reference(ctx.config, pairs_dir=args.pairs_dir, sft_dir=args.sft_dir)
        write_splits(out.splits, args.out_dir)
        finish(ctx, out, args.report, [args.out_dir])


if __name__ == "__main__":
    run_main(main)
