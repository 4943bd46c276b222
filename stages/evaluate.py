"""DVC stage `evaluate`: SFT, PPO, DPO and Best-of-N on held-out prompts, against the gold judge and SFT."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.eval.reports import plot_gold_vs_kl
from pipeline.files import write_text
from pipeline.methods.evaluate import run_evaluate
from stages.common import finish, run_main, stage

PATHS = {
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "ppo_dir": "models/ppo",
    "dpo_dir": "models/dpo",
    "reward_dir": "models/reward",
    "ppo_report": "reports/ppo.json",
    "report": "reports/metrics.json",
    "markdown": "reports/eval.md",
    "plot": "reports/eval_gold_vs_kl.png",
    "points": "reports/plots/eval.csv",
}


def main() -> None:
    with stage(
        "evaluate", PATHS, inputs=("data_dir", "sft_dir", "ppo_dir", "dpo_dir", "reward_dir", "ppo_report")
    ) as ctx:
        args = ctx.args
        out = run_evaluate(
            ctx.config,
            data_dir=args.data_dir,
            sft_dir=args.sft_dir,
            ppo_dir=args.ppo_dir,
            dpo_dir=args.dpo_dir,
            reward_dir=args.reward_dir,
            ppo_report=json.loads(Path(args.ppo_report).read_text()),
        )
        write_text(out.points_table().to_csv(index=False), args.points)
        plot_gold_vs_kl(out.points, args.plot, "Gold score vs KL to SFT (test prompts)")
        write_text(out.markdown, args.markdown)
        for path in (args.markdown, args.plot, args.points):
            ctx.run.log_artifact(path)
        ctx.run.log_metrics(out.headline, run_id=ctx.run.parent_run_id)  # the runs table compares these row by row
        finish(ctx, out, args.report, [])
        print(out.markdown.split("## Samples")[0])


if __name__ == "__main__":
    run_main(main)
