"""`trainer.compile`: the transformer body runs compiled in training, with the eager model's losses and gradients;
generation runs it eagerly (same tokens for the same seed); saved weights keep their names.
`generation.compile`: a static KV cache and a compiled decode step sample the eager path's tokens."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from pipeline.data.batches import SFTCollator
from pipeline.models.build import prepare_for_training, save_model
from pipeline.models.generation import SamplingParams, sample_ids
from tests.integration.helpers import sampling_case, sft_loss_and_grads, tiny_model, tiny_rows


@pytest.mark.slow
def test_compiled_body_trains_like_eager_and_generates_eagerly(
    model_cfg, cpu_trainer_cfg, tokenizer, reviews, tmp_path
):
    eager = tiny_model(model_cfg, tokenizer)
    compiled = prepare_for_training(
        copy.deepcopy(eager),
        model_cfg,
        dataclasses.replace(cpu_trainer_cfg, compile=True),
        disable_dropout=True,
        task="CAUSAL_LM",
    )
    prepare_for_training(eager, model_cfg, cpu_trainer_cfg, disable_dropout=True, task="CAUSAL_LM")
    assert compiled.transformer._compiled_call_impl is not None and eager.transformer._compiled_call_impl is None
    collate = SFTCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
    rows = tiny_rows(tokenizer, reviews, 16)
    for batch in (collate(rows[:8]), collate(rows[8:])):  # two lengths: dynamic shapes, no recompile per length
        loss, _, grads = sft_loss_and_grads(eager, batch)
        compiled_loss, _, compiled_grads = sft_loss_and_grads(compiled, batch)
        torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            assert (compiled_grads[name] - grad).norm() <= 1e-4 * grad.norm(), name
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    prompts = [r.prompt_ids for r in rows[:6]]
    frames = dict(counters["frames"])
    assert (
        sample_ids(compiled, tokenizer, prompts, params, batch_size=3, seed=5).completion_ids
        == sample_ids(eager, tokenizer, prompts, params, batch_size=3, seed=5).completion_ids
    )
    assert dict(counters["frames"]) == frames and frames  # decoding compiled nothing new
    save_model(compiled, tokenizer, tmp_path / "compiled")
    saved = load_file(tmp_path / "compiled" / "model.safetensors")
    assert set(saved) <= set(eager.state_dict()) and "transformer.h.0.attn.c_attn.weight" in saved


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_compiled_decoding_samples_the_eager_tokens(architecture, model_cfg, tokenizer, reviews, tmp_path):
    model, tokenizer, prompts = sampling_case(architecture, model_cfg, tokenizer, reviews, tmp_path)
    assert len({len(p) for p in prompts}) >= 4  # batches of different widths share one cache bucket
    eager = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
    expected = sample_ids(model, tokenizer, prompts, eager, batch_size=3, seed=5)
    graphs = counters["stats"]["unique_graphs"]
    compiled = dataclasses.replace(eager, compiled=True)
    got = sample_ids(model, tokenizer, prompts, compiled, batch_size=3, seed=5)
    assert got.completion_ids == expected.completion_ids and got.ended == expected.ended
    # one graph per batch size (3 and the last batch's 1), whatever the prompt widths; none again on a second call
    assert counters["stats"]["unique_graphs"] - graphs == 2
    again = sample_ids(model, tokenizer, prompts, compiled, batch_size=3, seed=5)
    assert again.completion_ids == expected.completion_ids and counters["stats"]["unique_graphs"] - graphs == 2
