"""Sampling through the preallocated KV cache gives the tokens of transformers' own concatenating cache."""

import pytest
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from pipeline.models import generation
from pipeline.models.generation import PreallocatedLayer, SamplingParams, sample_ids
from tests.integration.helpers import sampling_case, tiny_rows


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "neox", "sliding qwen2"])
def test_preallocated_cache_samples_the_concatenating_caches_tokens(
    architecture, model_cfg, tokenizer, reviews, tmp_path, monkeypatch
):
    if architecture == "sliding qwen2":  # a sliding-window layer (kept as transformers builds it) beside a full one
        model, tokenizer, prompts = sampling_case("llama", model_cfg, tokenizer, reviews, tmp_path)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=6,
                use_sliding_window=True,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
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
        assert full and all(
            isinstance(layer, PreallocatedLayer) and layer.key_buffer.shape[-2] == max_length for layer in full
        )
        sliding = [layer for layer in cache.layers if layer.is_sliding]
        assert len(sliding) == (architecture == "sliding qwen2")
        assert not any(isinstance(layer, PreallocatedLayer) for layer in sliding)
    monkeypatch.setattr(generation, "preallocated_cache", lambda model, max_length: DynamicCache(config=model.config))
    expected = sample_ids(model, tokenizer, prompts, params, batch_size=3, seed=5)
    assert got.completion_ids == expected.completion_ids and got.ended == expected.ended


def _never_ending(model_cfg, tokenizer, positions: int):
    """A scratch GPT-2 of `positions` positions that never samples EOS (it is suppressed)."""
    import dataclasses

    from tests.integration.helpers import tiny_model

    model = tiny_model(dataclasses.replace(model_cfg, n_positions=positions), tokenizer)
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    return model


def test_sampling_stops_at_the_models_context_and_counts_the_rows_it_cut(model_cfg, tokenizer, reviews):
    model = _never_ending(model_cfg, tokenizer, 32)
    rows = tiny_rows(tokenizer, reviews, 12)
    prompts = [(r.prompt_ids + r.completion_ids)[: 3 + 2 * i] for i, r in enumerate(rows)]  # 3 .. 25 tokens
    assert max(map(len, prompts)) >= 16 and min(map(len, prompts)) <= 5
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, key="ppo.max_new_tokens")
    got = sample_ids(model, tokenizer, prompts, params, batch_size=2, seed=3)
    assert not any(got.ended)
    for prompt, completion, stopped in zip(prompts, got.completion_ids, got.stopped_by_context, strict=True):
        assert len(prompt) + len(completion) <= 32
        assert stopped == (len(completion) < 24)  # cut by the context, not by the 24-token budget
    # Batches of 2 length-sorted prompts: a batch samples 32 minus its wider prompt, at most 24.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), 2):
        width = max(len(prompts[i]) for i in order[start : start + 2])
        assert {len(got.completion_ids[i]) for i in order[start : start + 2]} == {min(24, 32 - width)}
    assert 0 < sum(got.stopped_by_context) < len(prompts)


def test_a_budget_or_prompt_without_room_fails_before_sampling_naming_the_key(model_cfg, tokenizer, reviews):
    model = _never_ending(model_cfg, tokenizer, 32)
    prompts = [r.prompt_ids[:6] for r in tiny_rows(tokenizer, reviews, 3)]
    with pytest.raises(ValueError, match=r"ppo.max_new_tokens: 32 new tokens can never fit the model's context of 32"):
        sample_ids(
            model, tokenizer, prompts, SamplingParams(32, 1.0, 0, 1.0, key="ppo.max_new_tokens"), batch_size=2, seed=0
        )
    prompts.append(list(range(5, 37)))  # 32 tokens: no room left
    with pytest.raises(ValueError, match=r"prompt row 3 .* has 32 tokens .* no room for a response \(evaluate.max_new"):
        sample_ids(
            model,
            tokenizer,
            prompts,
            SamplingParams(8, 1.0, 0, 1.0, key="evaluate.max_new_tokens"),
            batch_size=2,
            seed=0,
        )
