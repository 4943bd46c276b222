"""DVC stage `evaluate`: SFT, PPO, DPO and Best-of-N on held-out prompts, against the gold judge and SFT."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import load_tokenizer
from pipeline.eval.policies import evaluate_policies, samples_table
from pipeline.eval.reports import HEADLINE, eval_markdown, plot_gold_vs_kl
from pipeline.files import write_text
from pipeline.models.build import build_causal_lm, build_reward_model, frozen
from pipeline.models.judges import build_judge
from stages.common import finish, inference_device, stage

PATHS = {
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "ppo_dir": "models/ppo",
    "dpo_dir": "models/dpo",
    "reward_dir": "models/reward",
    "report": "reports/metrics.json",
    "markdown": "reports/eval.md",
    "plot": "reports/eval_gold_vs_kl.png",
    "points": "reports/plots/eval.csv",
}


def main() -> None:
    with stage("evaluate", PATHS, inputs=("data_dir", "sft_dir", "ppo_dir", "dpo_dir", "reward_dir")) as ctx:
        cfg, args, device = ctx.config, ctx.args, inference_device()
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        load = lambda path: frozen(build_causal_lm(cfg.model, tokenizer, path=path), device)  # noqa: E731
        reward_model = frozen(build_reward_model(cfg.model, tokenizer, args.reward_dir), device)
        prompts = read_table(f"{args.data_dir}/test.parquet", PROMPT_COMPLETION)["prompt"].tolist()
        results, metrics = evaluate_policies(
            {"ppo": load(args.ppo_dir), "dpo": load(args.dpo_dir)}, load(args.sft_dir), reward_model,
            build_judge(cfg.judge).to(device), tokenizer, prompts, cfg.evaluate, seed=cfg.seed,
            compiled=cfg.generation.compile,
        )  # fmt: skip
        points = {name: (metrics[f"{name}/kl"], metrics[f"{name}/gold_score"]) for name in results}
        table = pd.DataFrame([{"policy": n, "kl": kl, "gold_score": g} for n, (kl, g) in points.items()])
        write_text(table.to_csv(index=False), args.points)
        plot_gold_vs_kl(points, args.plot, "Gold score vs KL to SFT (test prompts)")
        write_text(eval_markdown(results, metrics, prompts, cfg.evaluate.n_shown_samples), args.markdown)
        for path in (args.markdown, args.plot, args.points):
            ctx.run.log_artifact(path)
        ctx.run.log_table(samples_table(results, prompts), "samples/evaluate.json")
        # The pipeline's parent run carries the headline numbers, so the MLflow UI compares experiments row by row.
        headline = {k: v for k, v in metrics.items() if k.split("/")[1] in HEADLINE}
        ctx.run.log_metrics(headline, run_id=ctx.run.parent_run_id)
        finish(ctx, metrics, args.report, [])
        print(Path(args.markdown).read_text().split("## Samples")[0])


if __name__ == "__main__":
    main()
