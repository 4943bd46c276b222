"""Batched sampling with the KV cache, shared by preferences, DPO, PPO and evaluation.

Prompts are sorted by length and left-padded per batch (little padding, correct position ids from the attention
mask), generation stops per row at EOS and for the batch once every row has ended, and each completion comes
back without its EOS or padding, flagged with whether it ended. A response ends at any of the model's stop tokens
(`generation_config.eos_token_id`, a list under a chat template: the end-of-turn first); the collators re-append
the tokenizer's EOS, which is that end-of-turn. Every sampling knob is passed explicitly: transformers otherwise
applies a default `top_k=50`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.tokenization import encode


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    compiled: bool = False
    """Decode with a static KV cache and a compiled step (`generation.compile`): the same tokens for the same seed
    (the padded cache slots are masked out), one compile per batch size and cache bucket, faster where per-step
    overhead dominates (CUDA graphs on GPU)."""


@dataclass(frozen=True)
class Samples:
    """Completions in prompt order. `completion_ids` exclude EOS; `ended` says whether EOS was produced."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    ended: list[bool]


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS (a chat template's end-of-turn) first, then any other end
    token the model declares (Llama 3 Instruct lists `<|eot_id|>` and `<|end_of_text|>`); never the pad.

    `models.build_causal_lm` stores this list as the model's `generation_config.eos_token_id`, so a saved model
    carries it to every later stage."""
    declared = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        declared += value if isinstance(value, list) else [value]
    stops = [tokenizer.eos_token_id] + [t for t in declared if t is not None and t < len(tokenizer)]
    return [t for t in dict.fromkeys(stops) if t != tokenizer.pad_token_id]


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    batch_size: int,
    seed: int,
) -> Samples:
    """Sample one completion per prompt (repeat prompts for several)."""
    prompt_ids = encode(tokenizer, prompts)
    return sample_ids(model, tokenizer, prompt_ids, params, batch_size=batch_size, seed=seed)


@torch.no_grad()
def sample_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    batch_size: int,
    seed: int,
) -> Samples:
    """`sample` on already-tokenised prompts."""
    pad = tokenizer.pad_token_id
    stops = stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    longest = max(map(len, prompt_ids)) + params.max_new_tokens
    static = _static_compiled(model, device, longest) if params.compiled else {}
    completions: list[list[int]] = [[] for _ in prompt_ids]
    ended = [False] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in index)
        input_ids = torch.full((len(index), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            ids = prompt_ids[i]
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        with _stance(params.compiled):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=params.temperature > 0,
                temperature=params.temperature if params.temperature > 0 else None,
                top_k=params.top_k if params.temperature > 0 else None,
                top_p=params.top_p if params.temperature > 0 else None,
                max_new_tokens=params.max_new_tokens,
                eos_token_id=stops if len(stops) > 1 else stops[0],
                pad_token_id=pad,
                use_cache=True,
                **static,
            )
        for row, i in enumerate(index):
            tokens = output[row, width:].tolist()
            end = next((t for t, token in enumerate(tokens) if token in stops), None)
            if end is not None:
                tokens, ended[i] = tokens[:end], True
            else:
                tokens = [t for t in tokens if t != pad]
            completions[i] = tokens
    model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples([list(p) for p in prompt_ids], completions, texts, ended)


CACHE_BUCKET = 64  # static caches are sized in multiples of this, so nearby prompt widths share one compiled step


def _static_compiled(model: PreTrainedModel, device: torch.device, longest: int) -> dict[str, object]:
    """`generate` arguments for a preallocated KV cache and a compiled decode step: CUDA graphs on GPU
    (`reduce-overhead`), inductor's default mode elsewhere.

    Every batch of the call shares one cache length (`longest` = the longest prompt plus the token budget, rounded
    up to `CACHE_BUCKET`, capped at the model's positions), so only a new batch size compiles again. Transformers
    releases before `max_cache_len` size the cache per batch and compile once per prompt width."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
    config._compile_all_devices = True  # transformers compiles on CPU only when told so (a private flag)
    arguments: dict[str, object] = {"cache_implementation": "static", "compile_config": config}
    if hasattr(GenerationConfig(), "max_cache_len"):
        positions = getattr(model.config, "max_position_embeddings", None) or longest
        arguments["max_cache_len"] = max(longest, min(-(-longest // CACHE_BUCKET) * CACHE_BUCKET, positions))
    return arguments


def _stance(compiled: bool) -> contextlib.AbstractContextManager:
    """A body compiled for training (`trainer.compile`, dynamic shapes) decodes eagerly; a compiled decode step
    (`generation.compile`) is compiled by `generate` itself."""
    return contextlib.nullcontext() if compiled else torch.compiler.set_stance("force_eager")
