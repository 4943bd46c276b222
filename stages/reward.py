"""DVC stage `reward`: a Bradley-Terry reward model initialised from the SFT model with a fresh score head."""

from __future__ import annotations

from pipeline.data.batches import read_pairs
from pipeline.data.tokenization import load_tokenizer
from pipeline.eval.reports import write_curve
from pipeline.models.build import build_reward_model, prepare_for_training, save_model
from pipeline.models.lora import parameter_counts
from pipeline.train.reward import RewardStats, fit_reward
from stages.common import finish, stage

PATHS = {
    "pairs_dir": "data/preferences",
    "sft_dir": "models/sft",
    "model_dir": "models/reward",
    "report": "reports/reward.json",
    "curve": "reports/plots/reward.csv",
}


def main() -> None:
    with stage("reward", PATHS, inputs=("pairs_dir", "sft_dir")) as ctx:
        cfg, rm, args = ctx.config, ctx.config.reward, ctx.args
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        rows = {split: read_pairs(args.pairs_dir, split, tokenizer, rm.max_length) for split in ("train", "val")}
        model = prepare_for_training(build_reward_model(cfg.model, tokenizer, args.sft_dir), cfg.model, cfg.trainer,
                                     disable_dropout=rm.disable_dropout, task="SEQ_CLS")  # fmt: skip
        counts = parameter_counts(model)
        module, result = fit_reward(model, tokenizer, rows["train"], rows["val"], rm, cfg.trainer, seed=cfg.seed,
                                    logger=ctx.run.lightning_logger(), resume=ctx.resume_callback,
                                    ckpt_path=ctx.resume_from)  # fmt: skip
        if not result.is_global_zero:
            return
        metrics = result.metrics
        save_model(module.model, tokenizer, args.model_dir)
        # PPO normalises rewards with these (the distribution on held-out responses).
        RewardStats(mean=metrics["val/reward_mean"], std=metrics["val/reward_std"]).write(args.model_dir)
        write_curve(result.history, args.curve)
        metrics.update(counts)
        finish(ctx, metrics, args.report, [args.model_dir], step=result.step)
        print(f"reward: {metrics}")


if __name__ == "__main__":
    main()
