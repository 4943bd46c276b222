"""Sampling through the preallocated KV cache gives the tokens of transformers' own concatenating cache."""

import dataclasses

import pytest
from transformers import DynamicCache

from pipeline import generation
from pipeline.generation import PreallocatedLayer, SamplingParams, sample_ids
from pipeline.models import build_causal_lm
from pipeline.tokenization import encode, load_tokenizer
from tests.integration.helpers import tiny_model, tiny_rows
from tests.standins import chat_llama


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_preallocated_cache_samples_the_concatenating_caches_tokens(architecture, model_cfg, tokenizer, reviews,
                                                                     tmp_path, monkeypatch):  # fmt: skip
    if architecture == "llama":  # a chat model: two stop tokens, rotary positions, grouped-query attention
        path = chat_llama(tmp_path / "llama")
        tokenizer = load_tokenizer(path)
        model = build_causal_lm(dataclasses.replace(model_cfg, base=path), tokenizer)
        prompts = encode(tokenizer, [f"review {'very ' * i}good films" for i in range(7)])
    else:
        model = tiny_model(model_cfg, tokenizer)
        prompts = [r.prompt_ids[: 4 + i] for i, r in enumerate(tiny_rows(tokenizer, reviews, 7))]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
    caches = []

    def recorded(model, capacity):
        caches.append((capacity, generation.preallocated_cache.__wrapped__(model, capacity)))
        return caches[-1][1]

    recorded.__wrapped__ = generation.preallocated_cache
    monkeypatch.setattr(generation, "preallocated_cache", recorded)
    got = sample_ids(model, tokenizer, prompts, params, batch_size=3, seed=5)
    assert len(caches) == 3  # one per batch, each allocated once for its prompt width + the budget
    for capacity, cache in caches:
        assert all(isinstance(layer, PreallocatedLayer) and layer.key_buffer.shape[-2] == capacity
                   for layer in cache.layers)  # fmt: skip
    monkeypatch.setattr(generation, "preallocated_cache", lambda model, capacity: DynamicCache(config=model.config))
    expected = sample_ids(model, tokenizer, prompts, params, batch_size=3, seed=5)
    assert got.completion_ids == expected.completion_ids and got.ended == expected.ended
