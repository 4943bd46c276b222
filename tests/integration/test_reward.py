import torch
from mlflow.tracking import MlflowClient

from pipeline.data.batches import PairCollator
from pipeline.models.build import build_reward_model
from pipeline.track.tracking import StageRun
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.reward import RewardModule
from pipeline.train.trainer import History, Throughput, build_trainer
from tests.integration.helpers import changed, params_snapshot, saved_tiny_model, tiny_pairs


def test_reward_is_read_at_the_eos_of_each_row(model_cfg, tokenizer, reviews, tmp_path):
    model = build_reward_model(model_cfg, tokenizer, saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")).eval()
    batch = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)(tiny_pairs(tokenizer, reviews, 4))
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1  # right padding: the last real token is the EOS
    assert (batch["input_ids"][torch.arange(8), last] == tokenizer.eos_token_id).all()
    torch.testing.assert_close(scores, model.score(hidden[torch.arange(8), last])[:, 0])


def test_reward_module_trains_and_logs_to_mlflow(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path, tracking):
    model = build_reward_model(model_cfg, tokenizer, saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft"))
    module = RewardModule(model, lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=6, margin=0.0, center_coef=0.0)
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
    data = RowsDataModule(
        tiny_pairs(tokenizer, reviews, 48),
        tiny_pairs(tokenizer, reviews, 16, offset=100),
        collate,
        batch_size=8,
        seed=0,
    )
    before = params_snapshot(module)
    with StageRun(tracking, "reward", {}, {}) as run:
        trainer = build_trainer(
            cpu_trainer_cfg,
            max_steps=6,
            val_every_n_steps=3,
            grad_clip=1.0,
            logger=run.lightning_logger(),
            callbacks=[Throughput(), History()],
        )
        trainer.fit(module, datamodule=data)
    assert "model.score.weight" in changed(before, module) and len(changed(before, module)) > 10
    metrics = MlflowClient(tracking.tracking_uri).get_run(run.run_id).data.metrics
    expected = {
        "train/loss",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "val/margin",
        "val/reward_mean",
        "val/reward_std",
        "val/gold_accuracy",
        "val/gold_spearman",
        "perf/tokens_per_s",
    }
    assert expected <= set(metrics)
    assert -1.0 <= metrics["val/gold_spearman"] <= 1.0
