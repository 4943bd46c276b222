"""DVC stage `ppo`: RLHF of the SFT policy against the reward model with a KL penalty to the SFT reference, by PPO
(GAE with a value model) or a critic-free estimator (`ppo.advantage_estimator`)."""

from __future__ import annotations

import json

import pandas as pd

from pipeline.data.schemas import PROMPT_COMPLETION, read_table
from pipeline.data.tokenization import encode, load_tokenizer
from pipeline.eval.reports import plot_overoptimization, write_curve
from pipeline.models.build import build_causal_lm, build_reward_model, prepare_for_training, save_model
from pipeline.models.judges import build_judge
from pipeline.models.lora import parameter_counts
from pipeline.train.ppo import fit_ppo, summarize_history
from pipeline.train.reward import RewardStats
from stages.common import finish, stage

PATHS = {
    "data_dir": "data/prepared",
    "sft_dir": "models/sft",
    "reward_dir": "models/reward",
    "model_dir": "models/ppo",
    "report": "reports/ppo.json",
    "curve": "reports/plots/ppo.csv",
    "overoptimization": "reports/ppo_overoptimization.png",
}


def main() -> None:
    with stage("ppo", PATHS, inputs=("data_dir", "sft_dir", "reward_dir")) as ctx:
        cfg, ppo, args = ctx.config, ctx.config.ppo, ctx.args
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        prompts = read_table(f"{args.data_dir}/train.parquet", PROMPT_COMPLETION)["prompt"].unique().tolist()
        prompt_ids = encode(tokenizer, prompts)
        stats = RewardStats.read(args.reward_dir)
        train = {"disable_dropout": ppo.disable_dropout}
        policy = prepare_for_training(build_causal_lm(cfg.model, tokenizer, path=args.sft_dir), cfg.model, cfg.trainer,
                                      task="CAUSAL_LM", **train)  # fmt: skip
        value_model = None  # critic-free estimators never load one
        if ppo.advantage_estimator == "gae":
            value_model = prepare_for_training(build_reward_model(cfg.model, tokenizer, args.reward_dir), cfg.model,
                                               cfg.trainer, task="SEQ_CLS", **train)  # fmt: skip
        counts = parameter_counts(policy)
        counts["model/value_parameters"] = parameter_counts(value_model)["model/parameters"] if value_model else 0.0
        # Under LoRA the reference is the policy with its adapters disabled: no second copy.
        reference = None if cfg.model.lora_r else build_causal_lm(cfg.model, tokenizer, path=args.sft_dir)
        module, is_global_zero = fit_ppo(
            policy, value_model, reference, build_reward_model(cfg.model, tokenizer, args.reward_dir),
            build_judge(cfg.judge), tokenizer, prompt_ids, ppo, cfg.trainer, reward_mean=stats.mean,
            reward_std=stats.std, seed=cfg.seed, rank=ctx.rank, compiled_sampling=cfg.generation.compile,
            logger=ctx.run.lightning_logger(), resume=ctx.resume_callback, ckpt_path=ctx.resume_from,
        )  # fmt: skip
        if not is_global_zero:
            return
        save_model(module.policy, tokenizer, args.model_dir)  # LoRA adapters merged
        write_curve(module.history, args.curve)
        plot_overoptimization(module.history, args.overoptimization)
        ctx.run.log_artifact(args.overoptimization)
        ctx.run.log_table(pd.DataFrame(module.last_samples[: ppo.n_logged_samples]), "samples/ppo_rollouts.json")
        metrics = {**summarize_history(module.history), **counts}
        finish(ctx, metrics, args.report, [args.model_dir], step=len(module.history))
        print(f"ppo: {json.dumps(metrics, indent=1)}")


if __name__ == "__main__":
    main()
