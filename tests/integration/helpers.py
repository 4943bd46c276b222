"""Builders for integration tests: a tiny scratch model and tokenised rows from the embedded grammar."""

from __future__ import annotations

from pipeline.data.batches import tokenize_rows
from pipeline.models.build import build_causal_lm


def tiny_rows(tokenizer, reviews, n: int):
    chosen = reviews[:n]
    return tokenize_rows(tokenizer, [r.prompt for r in chosen], [r.completion for r in chosen], 96, "test rows")


def tiny_model(model_cfg, tokenizer, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return build_causal_lm(model_cfg, tokenizer)


def sampling_case(architecture: str, model_cfg, tokenizer, reviews, tmp_path):
    """(model, tokenizer, prompts) for sampling-equality tests: the scratch `gpt2`, the `llama` chat stand-in (two
    stop tokens, rotary positions, grouped-query attention) or the `neox` (Pythia-shaped) one; 7 prompts of at
    least 4 different widths."""
    import dataclasses

    from pipeline.data.tokenization import encode, load_tokenizer
    from tests.standins import chat_llama, neox_hub

    if architecture == "gpt2":
        prompts = [r.prompt_ids[: 4 + i] for i, r in enumerate(tiny_rows(tokenizer, reviews, 7))]
        return tiny_model(model_cfg, tokenizer), tokenizer, prompts
    path = {"llama": chat_llama, "neox": neox_hub}[architecture](tmp_path / architecture)
    tokenizer = load_tokenizer(path)
    model = build_causal_lm(dataclasses.replace(model_cfg, base=path), tokenizer)
    return model, tokenizer, encode(tokenizer, [f"review {'very ' * i}good films" for i in range(7)])


def sft_loss_and_grads(model, batch):
    """The SFT loss of `batch` (the module's own `_shared_step`), its target-token count, and every gradient."""
    from pipeline.train.sft import SFTModule

    model.zero_grad()
    loss, n_tokens = SFTModule(model, lr=1e-3, weight_decay=0.0, warmup_steps=0, max_steps=1)._shared_step(batch)
    loss.backward()
    return loss.detach(), n_tokens, {name: p.grad.clone() for name, p in model.named_parameters()}


def params_snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before, module) -> set[str]:
    return {name for name, p in module.named_parameters() if not p.detach().equal(before[name])}


def tiny_pairs(tokenizer, reviews, n: int, offset: int = 0):
    """Pairs whose chosen is the more positive of two grammar continuations (gold order)."""
    import pandas as pd

    from pipeline.data.batches import tokenize_pairs

    rows = []
    for a, b in zip(reviews[offset : offset + n], reviews[offset + n : offset + 2 * n], strict=True):
        high, low = (a, b) if a.gold >= b.gold else (b, a)
        rows.append((a.prompt, high.completion, low.completion, high.gold, low.gold))
    frame = pd.DataFrame(rows, columns=["prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"])
    return tokenize_pairs(tokenizer, frame, 160, "test pairs")


def saved_tiny_model(model_cfg, tokenizer, path):
    from pipeline.models.build import save_model

    save_model(tiny_model(model_cfg, tokenizer), tokenizer, path)
    return str(path)
