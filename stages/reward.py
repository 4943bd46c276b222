"""DVC stage `reward`: a Bradley-Terry reward model initialised from the SFT model with a fresh score head."""

from __future__ import annotations

from pipeline.batches import PairCollator, RowsDataModule, tokenize_pairs
from pipeline.io import write_json
from pipeline.models import build_reward_model, count_parameters, save_model
from pipeline.reports import write_curve
from pipeline.reward import RewardModule
from pipeline.schemas import PREFERENCE_PAIRS, read_table
from pipeline.tokenization import load_tokenizer
from pipeline.training import History, Throughput, build_trainer
from stages.common import finish, stage

PATHS = {
    "pairs_dir": "data/preferences",
    "sft_dir": "models/sft",
    "model_dir": "models/reward",
    "report": "reports/reward.json",
    "curve": "reports/plots/reward.csv",
}


def main() -> None:
    with stage("reward", ["seed", "model", "trainer", "reward"], PATHS) as ctx:
        cfg, rm, args = ctx.config, ctx.config.reward, ctx.args
        tokenizer = load_tokenizer(args.sft_dir, trust_remote_code=cfg.model.trust_remote_code)
        rows = {
            split: tokenize_pairs(tokenizer, read_table(f"{args.pairs_dir}/{split}.parquet", PREFERENCE_PAIRS),
                                  rm.max_length, f"{args.pairs_dir}/{split}.parquet")
            for split in ("train", "val")
        }  # fmt: skip
        module = RewardModule(
            build_reward_model(cfg.model, tokenizer, args.sft_dir), lr=rm.lr, weight_decay=rm.weight_decay,
            warmup_steps=rm.warmup_steps, max_steps=rm.max_steps, margin=rm.margin, center_coef=rm.center_coef,
        )  # fmt: skip
        data = RowsDataModule(rows["train"], rows["val"], PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id),
                              rm.batch_size, cfg.seed)  # fmt: skip
        throughput, history = Throughput(), History()
        trainer = build_trainer(cfg.trainer, max_steps=rm.max_steps, val_every_n_steps=rm.val_every_n_steps,
                                grad_clip=rm.grad_clip, logger=ctx.run.lightning_logger(),
                                callbacks=[throughput, history])  # fmt: skip
        trainer.fit(module, datamodule=data)
        trainer.validate(module, datamodule=data, verbose=False)
        if not trainer.is_global_zero:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        save_model(module.model, tokenizer, args.model_dir)
        # PPO normalises rewards with these (the distribution on held-out responses).
        write_json({"mean": metrics["val/reward_mean"], "std": metrics["val/reward_std"]},
                   f"{args.model_dir}/reward_stats.json")  # fmt: skip
        write_curve(history.rows, args.curve)
        metrics.update(throughput.summary)
        metrics["train/loss"] = next(
            (r["train/loss"] for r in reversed(history.rows) if "train/loss" in r), float("nan")
        )
        metrics["model/parameters"] = count_parameters(module.model)
        finish(ctx, metrics, args.report, [args.model_dir], step=trainer.global_step)
        print(f"reward: {metrics}")


if __name__ == "__main__":
    main()
