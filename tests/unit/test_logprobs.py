"""Memory-lean log-probs against the naive formula: values, entropies and gradients, in float32 and bfloat16."""

import dataclasses

import pytest
import torch

from pipeline.models.logprobs import (
    LEAN_MIN_VOCAB,
    entropy_from_logits,
    lean_token_logps,
    model_token_logps,
    token_logps,
)


def _naive(logits, targets):
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, targets[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_selective_log_softmax_matches_the_naive_formula_and_its_gradients(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    targets = torch.randint(0, 50, (3, 7))
    logps, entropy = lean_token_logps(hidden, head, targets, temperature=0.7, with_entropy=True, chunk_tokens=4)
    assert logps.dtype == torch.float32 and logps.shape == (3, 7)
    (logps.sum()).backward()
    lean_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    expected, expected_entropy = _naive(head(hidden).float() / 0.7, targets)
    expected.sum().backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(logps, expected.detach(), **tolerance)
    torch.testing.assert_close(entropy, expected_entropy.detach(), **tolerance)
    torch.testing.assert_close(lean_grads[0], hidden.grad, **tolerance)
    torch.testing.assert_close(lean_grads[1], head.weight.grad, **tolerance)


def test_bf16_token_logps_and_entropy_are_float32_and_match():
    torch.manual_seed(1)
    logits, ids = torch.randn(2, 6, 40, dtype=torch.bfloat16), torch.randint(0, 40, (2, 6))
    expected, expected_entropy = _naive(logits[:, :-1], ids[:, 1:])
    got = token_logps(logits, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(entropy_from_logits(logits[:, :-1]), expected_entropy)


@pytest.fixture(scope="module")
def large_vocab_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=LEAN_MIN_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def test_model_log_probs_at_a_real_vocabulary_skip_full_logits_and_match(large_vocab_llama, model_cfg, cpu_trainer_cfg):
    from pipeline.models.lora import with_lora

    ids = torch.randint(0, LEAN_MIN_VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    for model in (
        large_vocab_llama,
        with_lora(large_vocab_llama, dataclasses.replace(model_cfg, lora_r=2), task="CAUSAL_LM"),
    ):
        calls = []
        hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o, seen=calls: seen.append(o.shape))
        logps, entropy = model_token_logps(model, ids, mask, temperature=1.3, with_entropy=True)
        hook.remove()
        assert max(shape[0] for shape in calls) <= 1024 and len(calls[0]) == 2  # chunks of positions, never (B, T, V)
        expected, expected_entropy = _naive(model(input_ids=ids, attention_mask=mask).logits[:, :-1] / 1.3, ids[:, 1:])
        torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
