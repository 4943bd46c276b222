import time

import pytest
import pytorch_lightning as pl
from mlflow.tracking import MlflowClient

from pipeline.data.batches import SFTCollator
from pipeline.models.generation import SamplingParams, sample
from pipeline.track.tracking import StageRun
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.resume import ResumeCallback
from pipeline.train.sft import SFTModule
from pipeline.train.trainer import History, Throughput, build_trainer
from stages.checkpoints import Checkpoints
from tests.integration.helpers import changed, params_snapshot, sft_loss_and_grads, tiny_model, tiny_rows


def _fit(model_cfg, trainer_cfg, tokenizer, reviews, logger, steps=6, callbacks=(), checkpoints=None):
    model = tiny_model(model_cfg, tokenizer)
    module = SFTModule(model, lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=steps)
    data = RowsDataModule(
        tiny_rows(tokenizer, reviews, 64),
        tiny_rows(tokenizer, reviews[64:], 16),
        SFTCollator(tokenizer.pad_token_id, tokenizer.eos_token_id),
        batch_size=8,
        seed=0,
    )
    throughput, history = Throughput(), History()
    if checkpoints is not None:
        callbacks = [*callbacks, ResumeCallback(checkpoints, data, run_id="r")]
    trainer = build_trainer(
        trainer_cfg,
        max_steps=steps,
        val_every_n_steps=3,
        grad_clip=1.0,
        logger=logger,
        callbacks=[throughput, history, *callbacks],
    )
    before = params_snapshot(module)
    trainer.fit(module, datamodule=data)
    return module, before, throughput, history


def test_sft_trains_every_parameter_and_logs_to_mlflow(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tracking):
    with StageRun(tracking, "sft", {"sft.lr": 0.01}, {"sft.lr": 0.01, "seed": 0}) as run:
        module, before, throughput, history = _fit(
            model_cfg, cpu_trainer_cfg, tokenizer, reviews, run.lightning_logger()
        )
    assert changed(before, module) == set(before)  # every weight moved
    client = MlflowClient(tracking.tracking_uri)
    data = client.get_run(run.run_id).data
    assert {
        "train/loss",
        "val/loss",
        "val/perplexity",
        "perf/tokens_per_s",
        "perf/wall_s",
        "perf/peak_rss_mb",
    } <= set(data.metrics)
    assert data.params == {"sft.lr": "0.01"}
    assert data.tags["mlflow.parentRunId"] == run.parent_run_id
    assert len(client.get_metric_history(run.run_id, "train/loss")) == 6
    assert data.metrics["val/perplexity"] == pytest.approx(2.718281828 ** data.metrics["val/loss"], rel=1e-4)
    assert throughput.summary["perf/tokens"] > 0
    assert [row["step"] for row in history.rows if "val/loss" in row] == [3.0, 6.0]


def test_sft_lowers_validation_loss(model_cfg, cpu_trainer_cfg, tokenizer, reviews):
    module, _, _, history = _fit(model_cfg, cpu_trainer_cfg, tokenizer, reviews, logger=False, steps=30)
    val = [row["val/loss"] for row in history.rows if "val/loss" in row]
    assert val[-1] < val[0] - 0.5


def test_left_padded_batched_sampling_equals_one_by_one(model_cfg, tokenizer, reviews):
    model = tiny_model(model_cfg, tokenizer, seed=3)
    prompts = [reviews[0].prompt, "Short.", reviews[1].prompt + " And more words here to pad the others."]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0)
    batched = sample(model, tokenizer, prompts, greedy, batch_size=3, seed=0)
    single = [sample(model, tokenizer, [p], greedy, batch_size=1, seed=0) for p in prompts]
    assert batched.completion_ids == [s.completion_ids[0] for s in single]
    assert all(tokenizer.eos_token_id not in ids for ids in batched.completion_ids)


class _Stall(pl.Callback):
    """Slows the first training step and every validation run down by known amounts; records batch sizes."""

    def __init__(self) -> None:
        self.batch_tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, idx) -> None:
        self.batch_tokens.append(int(batch["attention_mask"].sum()))
        if idx == 0:
            time.sleep(FIRST_STEP_STALL)

    def on_validation_start(self, trainer, pl_module) -> None:
        time.sleep(VALIDATION_STALL)


FIRST_STEP_STALL, VALIDATION_STALL = 2.0, 0.3  # the first stall outweighs 5 steps of a loaded machine


def test_throughput_leaves_validation_and_then_the_first_step_out(model_cfg, cpu_trainer_cfg, tokenizer, reviews):
    stall = _Stall()
    _, _, throughput, _ = _fit(model_cfg, cpu_trainer_cfg, tokenizer, reviews, logger=False, callbacks=[stall])
    summary = throughput.summary
    assert summary["perf/tokens"] == sum(stall.batch_tokens) and len(stall.batch_tokens) == 6
    assert summary["perf/val_s"] >= 2 * VALIDATION_STALL  # validations at steps 3 and 6
    training = summary["perf/wall_s"] - summary["perf/val_s"]
    assert summary["perf/tokens_per_s"] == pytest.approx(summary["perf/tokens"] / training)
    first_seconds, first_tokens = throughput.first_step
    assert first_seconds >= FIRST_STEP_STALL and int(first_tokens) == stall.batch_tokens[0]
    steady = summary["perf/steady_tokens_per_s"]
    assert steady == pytest.approx((summary["perf/tokens"] - stall.batch_tokens[0]) / (training - first_seconds))
    assert steady > 1.5 * summary["perf/tokens_per_s"]  # the stalled first step weighed on the overall rate


def test_history_records_each_validation_with_its_own_value(model_cfg, cpu_trainer_cfg, tokenizer, reviews):
    _, _, _, history = _fit(model_cfg, cpu_trainer_cfg, tokenizer, reviews, logger=False, steps=9)
    val = [(row["step"], row["val/loss"]) for row in history.rows if "val/loss" in row]
    assert [step for step, _ in val] == [3.0, 6.0, 9.0]
    assert len({loss for _, loss in val}) == 3


@pytest.mark.parametrize("architecture", ["scratch gpt2", "llama"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(
    architecture, model_cfg, tokenizer, reviews, tmp_path
):
    import dataclasses

    import torch

    from pipeline.data.tokenization import load_tokenizer
    from pipeline.models.build import build_causal_lm, zero_dropout
    from tests.standins import chat_llama

    if architecture == "llama":  # rotary positions: position_ids must restart per sequence
        path = chat_llama(tmp_path / "llama")
        tokenizer = load_tokenizer(path)
        model = build_causal_lm(dataclasses.replace(model_cfg, base=path), tokenizer)
    else:
        model = tiny_model(model_cfg, tokenizer)
    zero_dropout(model)
    # completions cut to 2, 5, 8 or full tokens: lengths vary, so short sequences share rows
    rows = [
        dataclasses.replace(r, completion_ids=r.completion_ids[: (2, 5, 8, 99)[i % 4]])
        for i, r in enumerate(tiny_rows(tokenizer, reviews, 12))
    ]
    padded = SFTCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)(rows)
    packed = SFTCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=True)(rows)
    assert len(packed["input_ids"]) < len(padded["input_ids"])  # sequences shared rows
    assert packed["token_mask"].sum() == padded["attention_mask"].sum()
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # less padding
    loss, n_tokens, grads = sft_loss_and_grads(model, padded)
    packed_loss, packed_tokens, packed_grads = sft_loss_and_grads(model, packed)
    assert packed_tokens == n_tokens
    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_first_fit_decreasing_packs_without_splitting():
    from pipeline.data.batches import pack_sequences

    # capacity 10: 7 + 3, 6 + 4, 5; a 12 over capacity gets a row of its own
    assert pack_sequences([5, 7, 3, 6, 4], 10) == [[1, 2], [3, 4], [0]]
    assert pack_sequences([12, 3], 10) == [[0], [1]]


def test_checkpoint_cadence_is_a_runtime_knob_the_weights_do_not_depend_on(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    """Why `trainer.checkpoint_every_n_steps` is in no stage's cache key: checkpoints read the RNG, never draw."""
    import torch

    weights = []
    for every_n in (0, 2, 5):
        checkpoints = Checkpoints(tmp_path / f"every-{every_n}", every_n, keep=True)
        module, *_ = _fit(model_cfg, cpu_trainer_cfg, tokenizer, reviews, logger=False, checkpoints=checkpoints)
        weights.append(module.model.state_dict())
        written = sorted(path.name for path in checkpoints.directory.glob("step-*.ckpt"))
        assert written == ([] if every_n == 0 else ["step-000000006.ckpt"])  # the older ones replaced; the final one
    for other in weights[1:]:
        assert all(torch.equal(weights[0][key], other[key]) for key in weights[0])
