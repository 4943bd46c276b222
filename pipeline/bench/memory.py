"""The peak memory of one DPO training step at a real vocabulary, through the method's own path: `DPOModule`'s
`training_step` (the policy's pair log-probs, the `dpo.loss` of the config, its mean) and the backward pass.

`lean` False is the path before the memory work: the full logits and a float32 log-softmax of them, which
`pipeline.models.logprobs.model_token_logps` still takes below `LEAN_MIN_VOCAB` and is made to take here by raising
that threshold; True is the product's path at this vocabulary (chunked selective log-softmax under checkpointing).
Run each in its own process: the figure is the peak RSS above the process's size just before the step (on CUDA,
peak allocated memory).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import DPOConfig
from pipeline.models import logprobs
from pipeline.models.build import count_parameters
from pipeline.train.dpo import DPOModule
from pipeline.train.trainer import peak_rss_mb

MEMORY_VOCAB, MEMORY_TOKENS, MEMORY_PAIRS = 151_936, 512, 4


@contextlib.contextmanager
def _logits_path(lean: bool) -> Iterator[None]:
    """The product's path (`lean`), or the full logits at any vocabulary (`LEAN_MIN_VOCAB` raised, then restored)."""
    threshold = logprobs.LEAN_MIN_VOCAB
    if not lean:
        logprobs.LEAN_MIN_VOCAB = 2**62
    try:
        yield
    finally:
        logprobs.LEAN_MIN_VOCAB = threshold


def dpo_memory_step(lean: bool, cfg: DPOConfig, seed: int = 0) -> dict[str, float]:
    """Peak memory of one `DPOModule` training step (forward, loss, backward) of `cfg` at Qwen2.5's vocabulary:
    4 pairs x 512 tokens, a prompt quarter, on a 2-layer, 128-wide Llama (39 M parameters, nearly all in the
    embeddings and head), against zero reference log-probs."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(
        vocab_size=MEMORY_VOCAB,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device)
    module = DPOModule(model, cfg)
    ids = torch.randint(0, MEMORY_VOCAB, (2 * MEMORY_PAIRS, MEMORY_TOKENS), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    batch["loss_mask"][:, : MEMORY_TOKENS // 4] = 0  # a prompt quarter, as in a pair batch
    batch["reference_logps"] = torch.zeros(2 * MEMORY_PAIRS, device=device)
    before = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with _logits_path(lean), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer holds the module: nothing is logged
        loss = module.training_step(batch, 0)
        loss.backward()
    wall = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # the kernel's high-water mark lags the current RSS (updated lazily): the peak is at least both
        peak = max(peak_rss_mb() * 2**20, psutil.Process().memory_info().rss, before)
    return {"peak_mb": (peak - before) / 2**20, "wall_s": wall, "parameters": float(count_parameters(model))}
