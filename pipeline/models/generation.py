"""Batched sampling with the KV cache, shared by preferences, DPO, PPO and evaluation.

Prompts are sorted by length and left-padded per batch (little padding, correct position ids from the attention
mask), generation stops per row at EOS and for the batch once every row has ended, and each completion comes back
without its EOS or padding, flagged with whether it ended. The KV cache is allocated ahead of need and grown in
steps (`PreallocatedLayer`): each decoding step writes one position instead of concatenating the whole cache. A
response ends at any of the model's stop tokens (`generation_config.eos_token_id`, a list under a chat template: the
end-of-turn first); the collators re-append the tokenizer's EOS, which is that end-of-turn. Every sampling knob is
passed explicitly: transformers otherwise applies a default `top_k=50`.

Sampling never runs past the model's context (`context_length`: `n_positions`, `max_position_embeddings`). A budget
that can never fit (at least the context: a prompt takes one position) and a prompt that leaves no room are errors
raised before any batch is sampled, naming the params key of the budget. Otherwise a batch samples at most its
context minus its widest prompt (batches are length-sorted, so batch-mates differ by a few tokens): every row's prompt
plus response stays within the context, and a row cut short by it is flagged `stopped_by_context` and counted in
the stage's metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CompileConfig, DynamicCache, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer
from transformers.generation import utils as generation_utils

from pipeline.data.tokenization import encode


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
    key: str = "max_new_tokens"
    """The params key that set `max_new_tokens` (`ppo.max_new_tokens`), named by the errors about the context."""


@dataclass(frozen=True)
class Samples:
    """Completions in prompt order. `completion_ids` exclude EOS; `ended` says whether EOS was produced;
    `stopped_by_context` whether the model's context, not the token budget nor EOS, ended the row."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    ended: list[bool]
    stopped_by_context: list[bool]
    stop_tokens: list[int | None] | None = None
    """The stop token that ended each row (None: it did not end): EOS, or one of `extra_stops`."""
    logps: list[list[float]] | None = None
    """With `with_logps`: the sampler's log-prob of each completion token (and of the stop token that ended the row),
    from the raw logits at the sampling temperature: what the trainer's `model_token_logps` must reproduce."""


def context_length(model: PreTrainedModel) -> int | None:
    """Positions the model can attend over (`n_positions`, `max_position_embeddings`); None when it declares none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def check_room(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], params: SamplingParams
) -> None:
    """Raise, naming `params.key`, when sampling `prompts` would be refused for want of context: a stage that samples
    after training calls this before it trains."""
    _check_room(encode(tokenizer, prompts), params, context_length(model), tokenizer)


def _check_room(
    prompt_ids: Sequence[Sequence[int]], params: SamplingParams, context: int | None, tokenizer: PreTrainedTokenizerBase
) -> None:
    if context is None:
        return
    if params.max_new_tokens >= context:
        raise ValueError(
            f"{params.key}: {params.max_new_tokens} new tokens can never fit the model's context of "
            f"{context} positions (a prompt takes at least one); set it below {context}"
        )
    full = [i for i, ids in enumerate(prompt_ids) if len(ids) >= context]
    if full:
        first = prompt_ids[full[0]]
        shown = f" ({tokenizer.decode(first[:24])!r}...)"
        raise ValueError(
            f"prompt row {full[0]}{shown} has {len(first)} tokens ({len(full)} row(s) in all): the model's context of "
            f"{context} positions leaves no room for a response ({params.key}); shorten the prompts (the stage's "
            "max_length or prepare.prompt_words) or use a model with a longer context"
        )


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
    extra_stops: Sequence[int] = (),
    with_logps: bool = False,
) -> Samples:
    """`sample` on already-tokenised prompts. `extra_stops`: more tokens that end a row (a tool call's closing tag),
    each row's stop token reported in `stop_tokens`; `with_logps`: the sampler's log-probs of the tokens it drew."""
    pad = tokenizer.pad_token_id
    stops = stop_ids(model, tokenizer)
    stops += [t for t in extra_stops if t not in stops]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    context = context_length(model)
    _check_room(prompt_ids, params, context, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    longest = max(map(len, prompt_ids)) + params.max_new_tokens
    static = _static_compiled(model, device, min(longest, context or longest)) if params.compiled else {}
    completions: list[list[int]] = [[] for _ in prompt_ids]
    ended = [False] * len(prompt_ids)
    stopped = [False] * len(prompt_ids)
    stop_tokens: list[int | None] = [None] * len(prompt_ids)
    logps: list[list[float]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in index)
        new_tokens = min(params.max_new_tokens, context - width) if context else params.max_new_tokens
        input_ids = torch.full((len(index), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            ids = prompt_ids[i]
            input_ids[row, width - len(ids) :] = torch.as_tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        cache = static or {CACHE_ARGUMENT: preallocated_cache(model, width + new_tokens)}
        with _stance(params.compiled):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=params.temperature > 0,
                temperature=params.temperature if params.temperature > 0 else None,
                top_k=params.top_k if params.temperature > 0 else None,
                top_p=params.top_p if params.temperature > 0 else None,
                max_new_tokens=new_tokens,
                eos_token_id=stops if len(stops) > 1 else stops[0],
                pad_token_id=pad,
                use_cache=True,
                **({"output_logits": True, "return_dict_in_generate": True} if with_logps else {}),
                **cache,
            )
        if with_logps:
            drawn = drawn_log_probs(output, width, params.temperature)
            output = output.sequences
        for row, i in enumerate(index):
            tokens = output[row, width:].tolist()
            end = next((t for t, token in enumerate(tokens) if token in stops), None)
            if with_logps:
                logps[i] = drawn[row, : len(tokens) if end is None else end + 1].tolist()
            if end is not None:
                tokens, ended[i], stop_tokens[i] = tokens[:end], True, tokens[end]
            else:
                tokens = [t for t in tokens if t != pad]
                stopped[i] = new_tokens < params.max_new_tokens
                logps[i] = logps[i][: len(tokens)]
            completions[i] = tokens
    model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Samples(
        [list(p) for p in prompt_ids],
        completions,
        texts,
        ended,
        stopped,
        stop_tokens,
        logps if with_logps else None,
    )


def drawn_log_probs(output, width: int, temperature: float) -> torch.Tensor:
    """The log-prob of each token `generate` drew after the first `width` positions (its output with `output_logits`),
    under the raw logits at `temperature`. Shape: (B, new tokens), float32."""
    logits = torch.stack(output.logits, 1).float()  # (B, N, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    drawn = output.sequences[:, width : width + logits.shape[1]]
    return torch.log_softmax(logits, -1).gather(-1, drawn[..., None])[..., 0].cpu()


# Static caches are sized in multiples of this, so nearby prompt widths share one compiled step; a growing cache
# starts with this much room past the prompt.
CACHE_BUCKET = 64
# `generate`'s argument for a cache object: `cache` since transformers renamed `past_key_values` (which warns until 6)
CACHE_ARGUMENT = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """A full-attention KV cache layer that writes each step's keys and values into a buffer allocated ahead of need and
    hands back views of its filled prefix: the values `DynamicLayer`'s concatenation holds (the same attention, the
    same tokens), without copying the whole cache at every step (a cost that grows with the sequence: on CPU at
    batch 64, sampling 36 new tokens runs 2-6 % faster without it, 400 new tokens 1.57x).

    The buffer starts with room for `CACHE_BUCKET` positions past the prompt and, when full, grows by that many or
    by half, whichever is more, never past `max_length` (the prompt width plus the token budget) unless a call
    outgrows it: a batch whose rows all end early holds about what it uses, not the whole budget, and a long one is
    copied a few times, not at every step. After `DynamicLayer`'s own crop, reorder or batch selection the next
    update starts a buffer from what they left.
    """

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if not self._holds(end):
            self._reallocate(key_states, value_states, start, end)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _holds(self, end: int) -> bool:
        """Whether the buffer has room for `end` positions and `keys` is still a view of its prefix."""
        buffer = self.key_buffer
        return (
            buffer is not None
            and end <= buffer.shape[-2]
            and self.keys.numel() > 0
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.stride() == buffer.stride()
            and self.keys.shape[:-2] == buffer.shape[:-2]
        )

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, end: int) -> None:
        held = 0 if self.key_buffer is None else self.key_buffer.shape[-2]
        capacity = max(end, min(self.max_length, max(end + CACHE_BUCKET, held + held // 2)))
        self.key_buffer = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if start:
            self.key_buffer[..., :start, :] = self.keys
            self.value_buffer[..., :start, :] = self.values


def preallocated_cache(model: PreTrainedModel, max_length: int) -> DynamicCache:
    """The cache `generate` would build for `model` (sliding-window and other special layers kept as they are),
    its full-attention layers `PreallocatedLayer`s of at most `max_length` positions."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(max_length) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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
