"""LoRA, gradient accumulation, activation checkpointing and dropout, each under a real Trainer on tiny models."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline.data.batches import SFTCollator
from pipeline.data.tokenization import load_tokenizer
from pipeline.models.build import build_causal_lm, build_reward_model, prepare_for_training, save_model, zero_dropout
from pipeline.models.lora import as_reference, parameter_counts
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.sft import SFTModule
from pipeline.train.trainer import build_trainer
from tests.integration.helpers import tiny_model, tiny_rows
from tests.standins import chat_llama, gpt2_hub


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return chat_llama(tmp_path_factory.mktemp("hub") / "llama")


def _fit_sft(model, rows, trainer_cfg, *, batch_size, accumulate, steps=3):
    module = SFTModule(model, lr=3e-3, weight_decay=0.0, warmup_steps=1, max_steps=steps)
    data = RowsDataModule(
        rows,
        rows[:4],
        SFTCollator(model.config.pad_token_id, model.config.eos_token_id),
        batch_size,
        seed=0,
        accumulate=accumulate,
        weight=lambda row: len(row.completion_ids) + 1,
    )
    trainer = build_trainer(
        trainer_cfg,
        max_steps=steps,
        val_every_n_steps=None,
        grad_clip=1.0,
        logger=False,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, data)
    return module


def test_accumulated_micro_batches_give_the_large_batch_weights(model_cfg, cpu_trainer_cfg, tokenizer, reviews):
    rows = tiny_rows(tokenizer, reviews, 128)
    assert len({len(r.completion_ids) for r in rows}) > 5  # rows of many lengths: token weighting matters
    big = _fit_sft(tiny_model(model_cfg, tokenizer), rows, cpu_trainer_cfg, batch_size=32, accumulate=1)
    small = _fit_sft(tiny_model(model_cfg, tokenizer), rows, cpu_trainer_cfg, batch_size=16, accumulate=2)
    assert big.trainer.global_step == small.trainer.global_step == 3
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=name)


def test_lora_trains_adapters_only_and_saves_a_merged_self_contained_model(
    llama_dir, model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    cfg = dataclasses.replace(model_cfg, base=llama_dir, lora_r=8)
    hub_tokenizer = load_tokenizer(llama_dir)
    model = prepare_for_training(
        build_causal_lm(cfg, hub_tokenizer), cfg, cpu_trainer_cfg, disable_dropout=True, task="CAUSAL_LM"
    )
    counts = parameter_counts(model)
    assert 0 < counts["model/trainable_parameters"] < 0.2 * counts["model/parameters"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    module = _fit_sft(model, tiny_rows(hub_tokenizer, reviews, 64), cpu_trainer_cfg, batch_size=16, accumulate=1)
    named = dict(module.model.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in frozen.items())  # base weights untouched
    assert any(not torch.equal(named[n], p) for n, p in adapters.items() if "lora_B" in n)  # adapters learned

    ids = torch.tensor([hub_tokenizer("The plot was great.", add_special_tokens=False)["input_ids"]])
    module.model.eval()
    with torch.no_grad():
        adapted = module.model(input_ids=ids).logits
    save_model(module.model, hub_tokenizer, tmp_path / "sft")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_lora_reference_is_the_adapter_disabled_policy_not_a_copy(llama_dir, model_cfg, cpu_trainer_cfg):
    cfg = dataclasses.replace(model_cfg, base=llama_dir, lora_r=4)
    hub_tokenizer = load_tokenizer(llama_dir)
    # Each build draws the embedding rows of the tokens the tokenizer adds (its pad token) from the global RNG, as a
    # stage does after seeding: the same seed gives both models the same rows.
    torch.manual_seed(0)
    base = build_causal_lm(cfg, hub_tokenizer).eval()
    torch.manual_seed(0)
    policy = prepare_for_training(
        build_causal_lm(cfg, hub_tokenizer), cfg, cpu_trainer_cfg, disable_dropout=True, task="CAUSAL_LM"
    ).eval()
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter: the policy now differs from its base
    ids = torch.tensor([[5, 17, 42, 9, 77]])
    with torch.no_grad(), as_reference(policy, None) as reference:
        assert reference is policy  # the same module, hence the same weights: no second copy
        torch.testing.assert_close(reference(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits)
    with (
        pytest.raises(ValueError, match=r"no reference model given and the policy has no adapters"),
        as_reference(base, None),
    ):
        pass


def test_lora_reward_model_trains_its_score_head_and_merges(llama_dir, model_cfg, cpu_trainer_cfg, tmp_path):
    cfg = dataclasses.replace(model_cfg, base=llama_dir, lora_r=4)
    hub_tokenizer = load_tokenizer(llama_dir)
    model = prepare_for_training(
        build_reward_model(cfg, hub_tokenizer, llama_dir), cfg, cpu_trainer_cfg, disable_dropout=True, task="SEQ_CLS"
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05)
    ids = torch.tensor([[5, 17, 42, hub_tokenizer.eos_token_id]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_model(model, hub_tokenizer, tmp_path / "reward")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_dropout_off_makes_training_mode_deterministic(tmp_path, model_cfg):
    hub = gpt2_hub(tmp_path / "gpt2")  # hub GPT-2 config: dropout 0.1 everywhere
    model = build_causal_lm(dataclasses.replace(model_cfg, base=hub), load_tokenizer(hub))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    assert model.training and not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    zero_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_activation_checkpointing_gives_the_same_gradients(llama_dir, model_cfg, cpu_trainer_cfg):
    cfg = dataclasses.replace(model_cfg, base=llama_dir)
    hub_tokenizer = load_tokenizer(llama_dir)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 8]])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        trainer_cfg = dataclasses.replace(cpu_trainer_cfg, gradient_checkpointing=checkpointing)
        model = prepare_for_training(
            build_causal_lm(cfg, hub_tokenizer), cfg, trainer_cfg, disable_dropout=True, task="CAUSAL_LM"
        )
        assert model.is_gradient_checkpointing == checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
