"""DVC stage `preferences`: preference pairs from SFT samples and the simulated annotator, or from a dataset."""

from __future__ import annotations

from pipeline.files import write_splits
from pipeline.methods.preferences import run_preferences
from stages.common import finish, run_main, stage

PATHS = {
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "out_dir": "data/preferences",
    "report": "reports/preferences.json",
}


def main() -> None:
    with stage("preferences", PATHS, inputs=("data_dir", "sft_dir")) as ctx:
        args = ctx.args
        out = run_preferences(ctx.config, data_dir=args.data_dir, sft_dir=args.sft_dir)
        write_splits(out.splits, args.out_dir)
        finish(ctx, out, args.report, [args.out_dir])


if __name__ == "__main__":
    run_main(main)
