"""Sampling through the preallocated KV cache gives the tokens of transformers' own concatenating cache."""

import pytest
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from pipeline import generation
from pipeline.generation import PreallocatedLayer, SamplingParams, sample_ids
from tests.integration.helpers import sampling_case


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "neox", "sliding qwen2"])
def test_preallocated_cache_samples_the_concatenating_caches_tokens(architecture, model_cfg, tokenizer, reviews,
                                                                     tmp_path, monkeypatch):  # fmt: skip
    if architecture == "sliding qwen2":  # a sliding-window layer (kept as transformers builds it) beside a full one
        model, tokenizer, prompts = sampling_case("llama", model_cfg, tokenizer, reviews, tmp_path)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, layer_types=["sliding_attention", "full_attention"], sliding_window=6,
            use_sliding_window=True, eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).eval()  # fmt: skip
    else:
        model, tokenizer, prompts = sampling_case(architecture, model_cfg, tokenizer, reviews, tmp_path)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
    real, caches = generation.preallocated_cache, []

    def recorded(model, max_length):
        caches.append((max_length, real(model, max_length)))
        return caches[-1][1]

    monkeypatch.setattr(generation, "preallocated_cache", recorded)
    got = sample_ids(model, tokenizer, prompts, params, batch_size=3, seed=5)
    assert len(caches) == 3  # one per batch; a 12-token budget fits the first allocation (prompt width + 12)
    for max_length, cache in caches:
        full = [layer for layer in cache.layers if not layer.is_sliding]
        assert full and all(isinstance(layer, PreallocatedLayer) and layer.key_buffer.shape[-2] == max_length
                            for layer in full)  # fmt: skip
        sliding = [layer for layer in cache.layers if layer.is_sliding]
        assert len(sliding) == (architecture == "sliding qwen2")
        assert not any(isinstance(layer, PreallocatedLayer) for layer in sliding)
    monkeypatch.setattr(generation, "preallocated_cache", lambda model, max_length: DynamicCache(config=model.config))
    expected = sample_ids(model, tokenizer, prompts, params, batch_size=3, seed=5)
    assert got.completion_ids == expected.completion_ids and got.ended == expected.ended
