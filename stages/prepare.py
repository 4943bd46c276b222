"""DVC stage `prepare`: prompt/completion splits and, for a scratch model, the BPE tokenizer."""

from __future__ import annotations

from pipeline.files import atomic_path, write_splits
from pipeline.methods.prepare import run_prepare
from stages.common import finish, run_main, stage

PATHS = {"data_dir": "data/prepared", "tokenizer_dir": "models/tokenizer", "report": "reports/prepare.json"}


def main() -> None:
    with stage("prepare", PATHS) as ctx:
        out, args = run_prepare(ctx.config), ctx.args
        write_splits(out.splits, args.data_dir)
        with atomic_path(args.tokenizer_dir) as tmp:
            out.tokenizer.save_pretrained(tmp)
        finish(ctx, out, args.report, [args.data_dir, args.tokenizer_dir])


if __name__ == "__main__":
    run_main(main)
