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


def test_an_ensembles_heads_train_on_their_own_bootstraps_and_load_back_with_their_stats(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    from pipeline.models.build import save_model
    from pipeline.train.reward import RewardStats, bootstrap_weights

    weights = bootstrap_weights(torch.Size([64, 3]), seed=5, step=7)
    assert torch.equal(weights, bootstrap_weights(torch.Size([64, 3]), seed=5, step=7))  # a resumed step draws these
    assert not torch.equal(weights[:, 0], weights[:, 1]) and 0.7 < weights.mean() < 1.3  # each head its own resample
    sft = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    model = build_reward_model(model_cfg, tokenizer, sft, heads=3)
    module = RewardModule(
        model, lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=6, margin=0.0, center_coef=0.0, heads=3, seed=5
    )
    data = RowsDataModule(
        tiny_pairs(tokenizer, reviews, 48),
        tiny_pairs(tokenizer, reviews, 16, offset=100),
        PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id),
        batch_size=8,
        seed=0,
    )
    trainer = build_trainer(cpu_trainer_cfg, max_steps=6, val_every_n_steps=6, grad_clip=1.0, logger=False)
    trainer.fit(module, datamodule=data)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert {f"val/head{h}/reward_mean" for h in range(3)} <= set(metrics) and "val/ensemble_spread" in metrics
    heads = tuple((metrics[f"val/head{h}/reward_mean"], metrics[f"val/head{h}/reward_std"]) for h in range(3))
    assert len({mean for mean, _ in heads}) == 3  # three different heads
    save_model(model, tokenizer, tmp_path / "reward")
    RewardStats(heads[0][0], heads[0][1], heads).write(tmp_path / "reward")
    stats = RewardStats.read(tmp_path / "reward")
    assert stats.heads == heads and stats.means == tuple(m for m, _ in heads)
    loaded = build_reward_model(model_cfg, tokenizer, str(tmp_path / "reward")).eval()  # its own three heads
    batch = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)(tiny_pairs(tokenizer, reviews, 4))
    assert loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.shape == (8, 3)
    one = RewardStats(1.0, 2.0)
    one.write(tmp_path / "one")
    assert (tmp_path / "one" / RewardStats.FILE).read_text().count("heads") == 0  # one head: the file as before
