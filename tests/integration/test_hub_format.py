"""The hub-loading path, exercised offline on local files in the hub's formats (save_pretrained dirs, JSON)."""

import dataclasses

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.data.batches import SFTCollator
from pipeline.data.tokenization import load_tokenizer
from pipeline.models.build import build_causal_lm, build_reward_model, save_model
from pipeline.train.datamodule import RowsDataModule
from pipeline.train.sft import SFTModule
from pipeline.train.trainer import build_trainer
from tests.integration.helpers import tiny_rows


def _gpt2_like_checkpoint(tokenizer, path):
    """A save_pretrained dir shaped like `gpt2`: EOS but no pad token, vocab without the pad."""
    backend = tokenizer.backend_tokenizer
    hub_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    config = GPT2Config(vocab_size=len(hub_tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    hub_tokenizer.save_pretrained(path)
    assert hub_tokenizer.pad_token_id is None


def test_local_hub_checkpoint_gets_a_distinct_pad_and_trains(tmp_path, model_cfg, cpu_trainer_cfg, tokenizer, reviews):
    _gpt2_like_checkpoint(tokenizer, tmp_path / "gpt2-like")
    hub_cfg = dataclasses.replace(model_cfg, base=str(tmp_path / "gpt2-like"))
    loaded = load_tokenizer(hub_cfg.base)
    assert loaded.pad_token_id is not None and loaded.pad_token_id != loaded.eos_token_id
    model = build_causal_lm(hub_cfg, loaded)
    assert model.get_input_embeddings().num_embeddings == len(loaded)
    assert model.config.pad_token_id == loaded.pad_token_id and model.training
    assert (tmp_path / "gpt2-like" / "model.safetensors").exists()

    rows = tiny_rows(loaded, reviews, 16)
    module = SFTModule(model, lr=1e-2, weight_decay=0.0, warmup_steps=1, max_steps=2)
    data = RowsDataModule(rows, rows[:4], SFTCollator(loaded.pad_token_id, loaded.eos_token_id), 8, 0)
    before = model.transformer.wte.weight.detach().clone()
    build_trainer(cpu_trainer_cfg, max_steps=2, val_every_n_steps=None, grad_clip=1.0, logger=False).fit(module, data)
    assert not torch.equal(before, model.transformer.wte.weight)

    save_model(model, loaded, tmp_path / "sft")
    reward = build_reward_model(hub_cfg, load_tokenizer(str(tmp_path / "sft")), str(tmp_path / "sft"))
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == loaded.pad_token_id


def test_gpt2_checkpoints_load_with_the_fused_gelu_of_the_same_function(tmp_path, model_cfg):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from tests.standins import gpt2_hub

    path = gpt2_hub(tmp_path / "gpt2")
    hub = dataclasses.replace(model_cfg, base=path)
    tokenizer = load_tokenizer(path)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    fused = build_causal_lm(hub, tokenizer).eval()
    assert isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)
    assert isinstance(fused.transformer.h[0].mlp.act, GELUTanh)
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    vocab = plain.config.vocab_size  # the loader added a pad token row
    torch.testing.assert_close(fused(ids).logits[..., :vocab], plain(ids).logits, atol=1e-5, rtol=1e-5)
    reward = build_reward_model(hub, tokenizer, path)
    assert isinstance(reward.transformer.h[0].mlp.act, GELUTanh)
