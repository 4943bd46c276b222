"""Packed preference pairs (`PairCollator(packing=True)`) give the reward model and DPO the same scores, losses and
gradients as the padded batch, on GPT-2 (learned absolute positions: they must restart per sequence) and Llama
(rotary, grouped-query attention)."""

import dataclasses

import pytest
import torch

from pipeline.data.batches import PairCollator
from pipeline.data.tokenization import load_tokenizer
from pipeline.models.build import build_causal_lm, build_reward_model, zero_dropout
from pipeline.models.reference import pair_lengths, pair_logps
from pipeline.train.dpo import DPOModule
from pipeline.train.reward import RewardModule, bradley_terry_loss
from tests.defaults import default_section
from tests.integration.helpers import saved_tiny_model, tiny_pairs
from tests.standins import chat_llama


def _model_dir(architecture, model_cfg, tokenizer, tmp_path):
    if architecture == "llama":
        path = chat_llama(tmp_path / "llama")
        return path, load_tokenizer(path), dataclasses.replace(model_cfg, base=path)
    return saved_tiny_model(model_cfg, tokenizer, tmp_path / "gpt2"), tokenizer, model_cfg


def _batches(tokenizer, reviews):
    # rejected cut to 1, 4 or all of its tokens: lengths differ within pairs, so padded rows waste tokens
    pairs = [
        dataclasses.replace(p, rejected_ids=p.rejected_ids[: (1, 4, 99)[i % 3]])
        for i, p in enumerate(tiny_pairs(tokenizer, reviews, 6))
    ]
    padded = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)(pairs)
    packed = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id, packing=True)(pairs)
    assert len(packed["input_ids"]) < len(padded["input_ids"])  # sequences shared rows
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # less padding
    assert packed["token_mask"].sum() == padded["attention_mask"].sum()
    for key in ("gold", "reference_logps", "index"):  # reference_logps: NaN until attached
        torch.testing.assert_close(packed[key], padded[key], rtol=0, atol=0, equal_nan=True, msg=key)
    return padded, packed


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(packed_grads, grads):
    """Each gradient equal to float rounding: its difference under 1e-5 of its norm (sums over a different
    layout round differently)."""
    assert packed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert grad.norm() > 0, name
        assert (packed_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


@pytest.mark.parametrize("architecture", ["scratch gpt2", "llama"])
def test_packed_pairs_give_the_reward_model_the_same_scores_and_gradients(
    architecture, model_cfg, tokenizer, reviews, tmp_path
):
    path, tokenizer, cfg = _model_dir(architecture, model_cfg, tokenizer, tmp_path)
    model = build_reward_model(cfg, tokenizer, path)
    zero_dropout(model)
    module = RewardModule(model, lr=1e-3, weight_decay=0.0, warmup_steps=0, max_steps=1, margin=0.5, center_coef=0.01)
    padded, packed = _batches(tokenizer, reviews)
    results = []
    for batch in (padded, packed):
        chosen, rejected = module.rewards(batch)  # training_step's loss, without a trainer to log to
        loss = bradley_terry_loss(chosen, rejected, margin=0.5, center_coef=0.01).mean()
        results.append((chosen.detach(), rejected.detach(), loss.detach(), _grads(model, loss)))
    (chosen, rejected, loss, grads), (p_chosen, p_rejected, p_loss, p_grads) = results
    torch.testing.assert_close(p_chosen, chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_rejected, rejected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_loss, loss, atol=1e-6, rtol=1e-5)
    assert "score.weight" in grads
    _assert_same(p_grads, grads)


@pytest.mark.parametrize("architecture", ["scratch gpt2", "llama"])
@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_packed_pairs_give_dpo_the_same_log_probs_losses_and_gradients(
    architecture, loss, model_cfg, tokenizer, reviews, tmp_path
):
    path, tokenizer, cfg = _model_dir(architecture, model_cfg, tokenizer, tmp_path)
    policy = build_causal_lm(cfg, tokenizer, path=path)
    zero_dropout(policy)
    padded, packed = _batches(tokenizer, reviews)
    with torch.no_grad():  # stand-in reference log-probs: the policy's own, shifted apart
        logps = torch.cat(pair_logps(policy, padded))
        reference = logps - torch.linspace(-1.0, 1.0, len(logps))
    cfg = default_section("dpo", beta=0.5, loss=loss, label_smoothing=0.0, lr=1e-3, warmup_steps=0, max_steps=1)
    module = DPOModule(policy, cfg)
    results = []
    for batch in (padded, packed):
        batch = {**batch, "reference_logps": reference}
        out = module._shared_step(batch)
        results.append(({k: v.detach() for k, v in out.items()}, _grads(policy, out["loss"])))
    (out, grads), (p_out, p_grads) = results
    for lengths, p_lengths in zip(pair_lengths(padded), pair_lengths(packed), strict=True):
        assert p_lengths.tolist() == lengths.tolist()
    assert pair_lengths(padded)[1].tolist() != pair_lengths(padded)[0].tolist()
    for key, value in out.items():
        torch.testing.assert_close(p_out[key], value, atol=1e-5, rtol=1e-5, msg=key)
    _assert_same(p_grads, grads)
