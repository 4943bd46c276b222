import dataclasses

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.data.batches import PairCollator
from pipeline.models.build import build_causal_lm
from pipeline.models.generation import SamplingParams, sample
from pipeline.models.logprobs import sequence_kl
from pipeline.models.reference import attach_reference, pair_logps, reference_logps
from pipeline.track.tracking import StageRun
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.dpo import DPOModule
from pipeline.train.trainer import Throughput, build_trainer
from tests.defaults import default_section
from tests.integration.helpers import changed, params_snapshot, saved_tiny_model, tiny_pairs


def test_dpo_trains_the_policy_against_cached_reference(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path, tracking
):
    path = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    reference = build_causal_lm(model_cfg, tokenizer, path=path).requires_grad_(False)
    policy = build_causal_lm(model_cfg, tokenizer, path=path)
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
    train, val = tiny_pairs(tokenizer, reviews, 48), tiny_pairs(tokenizer, reviews, 16, offset=100)
    cached = reference_logps(reference, train, collate, batch_size=7)

    # The cache equals a live reference forward pass over DPO's own batches.
    batch = collate(train[:8])
    live_chosen, live_rejected = pair_logps(reference, batch)
    torch.testing.assert_close(torch.tensor(cached["reference_chosen_logps"][:8].to_numpy()).float(), live_chosen)
    torch.testing.assert_close(torch.tensor(cached["reference_rejected_logps"][:8].to_numpy()).float(), live_rejected)

    rows = attach_reference(train, cached, "train")
    val_rows = attach_reference(val, reference_logps(reference, val, collate, batch_size=16), "val")
    cfg = default_section("dpo", beta=0.1, loss="sigmoid", label_smoothing=0.0, lr=1e-2, weight_decay=0.0)
    module = DPOModule(policy, dataclasses.replace(cfg, warmup_steps=1, max_steps=6))
    before_policy, before_reference = params_snapshot(module), params_snapshot(reference)
    with StageRun(tracking, "dpo", {}, {}) as run:
        trainer = build_trainer(
            cpu_trainer_cfg,
            max_steps=6,
            val_every_n_steps=3,
            grad_clip=1.0,
            logger=run.lightning_logger(),
            callbacks=[Throughput()],
        )
        trainer.fit(module, datamodule=RowsDataModule(rows, val_rows, collate, batch_size=8, seed=0))
    assert changed(before_policy, module) == set(before_policy)
    assert changed(before_reference, reference) == set()
    metrics = MlflowClient(tracking.tracking_uri).get_run(run.run_id).data.metrics
    names = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ]
    assert {"train/loss", "val/loss", *names, *(f"val/{n}" for n in names)} <= set(metrics)

    # Sampled KL: zero against itself, positive once the policy has moved.
    prompts = [r.prompt for r in reviews[:24]]
    samples = sample(module.policy, tokenizer, prompts, SamplingParams(12, 1.0, 0, 1.0), batch_size=24, seed=0)
    assert sequence_kl(module.policy, module.policy, samples, tokenizer, 8).abs().max() < 1e-4
    assert sequence_kl(module.policy, reference, samples, tokenizer, 8).mean() > 0


def test_cache_for_other_rows_is_refused(model_cfg, tokenizer, reviews, tmp_path):
    import pandas as pd
    import pytest

    cached = pd.DataFrame({"index": [0], "reference_chosen_logps": [-1.0], "reference_rejected_logps": [-2.0]})
    with pytest.raises(
        ValueError,
        match=r"data/reference/train\.parquet: cached reference log-probs cover 1 rows "
        r"but the pairs table has 4; rerun the reference stage",
    ):
        attach_reference(tiny_pairs(tokenizer, reviews, 4), cached, "data/reference/train.parquet")


def test_reference_free_losses_train_without_any_reference_log_probs(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    import math

    path = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
    rows = tiny_pairs(tokenizer, reviews, 32)  # no reference attached: the cached log-probs are NaN
    assert all(math.isnan(r.reference_chosen_logps) for r in rows)
    for loss, extra in (("simpo", {"beta": 2.0, "simpo_gamma": 0.5}), ("orpo", {"beta": 0.1, "orpo_lambda": 0.1})):
        cfg = default_section("dpo", loss=loss, lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=4, **extra)
        module = DPOModule(build_causal_lm(model_cfg, tokenizer, path=path), cfg)
        before = params_snapshot(module)
        trainer = build_trainer(cpu_trainer_cfg, max_steps=4, val_every_n_steps=None, grad_clip=1.0, logger=False)
        trainer.fit(module, datamodule=RowsDataModule(rows, rows[:8], collate, batch_size=8, seed=0))
        assert changed(before, module) == set(before), loss
        assert math.isfinite(float(trainer.callback_metrics["train/loss"])), loss


def test_kto_learns_from_the_pairs_made_unpaired_desirable_up_undesirable_down(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    from pipeline.data.unpaired import UnpairedCollator, unpair
    from pipeline.train.dpo import kl_reference

    path = saved_tiny_model(model_cfg, tokenizer, tmp_path / "sft")
    reference = build_causal_lm(model_cfg, tokenizer, path=path).requires_grad_(False)
    pairs = tiny_pairs(tokenizer, reviews, 32)
    pairs = attach_reference(pairs, reference_logps(reference, pairs, PairCollator(0, 0), batch_size=8), "train")
    cfg = default_section("dpo", loss="kto", beta=0.1, lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=8)
    rows = kl_reference(reference, unpair(pairs, 1.0, seed=0), tokenizer, cfg)
    collate = UnpairedCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
    module = DPOModule(build_causal_lm(model_cfg, tokenizer, path=path), cfg)
    with torch.no_grad():
        start = {key: float(value) for key, value in module._shared_step(collate(rows[:16])).items()}
    assert start["loss"] == pytest.approx(0.5) and start["kl"] == pytest.approx(0.0, abs=1e-5)  # policy = reference
    assert start["rewards/desirable"] == pytest.approx(0.0, abs=1e-5) == start["rewards/undesirable"]
    trainer = build_trainer(cpu_trainer_cfg, max_steps=8, val_every_n_steps=None, grad_clip=1.0, logger=False)
    trainer.fit(module, datamodule=RowsDataModule(rows, rows[:8], collate, batch_size=16, seed=0))
    batch = collate(rows)
    with torch.no_grad():
        policy, _ = pair_logps(module.policy.eval(), batch)
    ratios, desirable = policy - batch["reference_logps"].chunk(2)[0], batch["desirable"]
    assert ratios[desirable].mean() > ratios[~desirable].mean() + 1.0  # the desirable responses gained on the others
    assert {"rewards/desirable", "rewards/undesirable", "kl"} <= set(trainer.callback_metrics)
