"""The one log-prob helper every stage uses: next-token log-probs of a sequence, masked and summed.

Logits at position t score the token at t + 1, so the shift happens here once. `mask` marks the tokens that
count (the response, in every stage) and is aligned with `input_ids`; its first column is never scored.

Memory at real vocabularies. A (B, T, V) logits tensor at V = 151,936 is gigabytes, and a float32 log-softmax of
it as much again. `model_token_logps` therefore never materialises full logits once the vocabulary reaches
`LEAN_MIN_VOCAB`: it runs the model's backbone, then the output head on `CHUNK_TOKENS` positions at a time, and for
each chunk keeps only the chosen token's logit minus the chunk's float32 log-sum-exp (a selective log-softmax),
under activation checkpointing, so the backward pass recomputes one chunk's logits at a time too. Entropy is
computed per chunk the same way. Below that vocabulary size (the embedded task's 2,000 tokens) full logits are
small and the plain path is kept. All log-probs, entropies and the losses built on them are float32 whatever the
model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.data.batches import length_sorted_batches, response_batch
from pipeline.models.lora import as_reference, backbone, root_call, unwrapped

LEAN_MIN_VOCAB = 32_768
CHUNK_TOKENS = 1024


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token, in float32.

    Args:
        logits: Shape: (B, T, V).
        input_ids: Shape: (B, T).

    Returns:
        Shape: (B, T - 1); entry t is log p(input_ids[:, t + 1] | input_ids[:, : t + 1]).
    """
    assert logits.shape[:2] == input_ids.shape, f"logits {tuple(logits.shape)} vs ids {tuple(input_ids.shape)}"
    shifted, targets = logits[:, :-1], input_ids[:, 1:]  # (B, T-1, V), (B, T-1)
    # cross_entropy is the fused, memory-light form of log_softmax + gather.
    if shifted.dtype == torch.float32:
        return -F.cross_entropy(shifted.transpose(1, 2), targets, reduction="none")
    # Lower precision: upcast one sequence at a time, never a float32 copy of the whole (B, T, V).
    return torch.stack(
        [-F.cross_entropy(row.float(), t, reduction="none") for row, t in zip(shifted, targets, strict=True)]
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, in float32, one sequence at a time. Shape: (B, T, V) -> (B, T)."""
    rows = []
    for row in logits:
        row = row.float()  # (T, V)
        rows.append(torch.logsumexp(row, -1) - (torch.softmax(row, -1) * row).sum(-1))
    return torch.stack(rows)


def model_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token log-probs (and detached entropies) of a causal LM on a batch, at `temperature`.

    `attention_mask` is (B, T), or a packed batch's (B, 1, T, T) block-diagonal mask with its `position_ids`.

    Returns:
        (logps, entropy or None), each of shape (B, T - 1).
    """
    base = unwrapped(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if head is None or head.weight.shape[0] < LEAN_MIN_VOCAB or _rescales_logits(base.config):
        logits = model(**inputs).logits
        if temperature != 1.0:
            logits = logits / temperature
        entropy = entropy_from_logits(logits[:, :-1].detach()) if with_entropy else None
        return token_logps(logits, input_ids), entropy
    return root_call(model, _lean_model_logps, head, inputs, temperature, with_entropy)


def _lean_model_logps(model, head, inputs, temperature: float, with_entropy: bool):
    hidden = backbone(model)(**inputs).last_hidden_state[:, :-1]  # (B, T-1, H)
    targets = inputs["input_ids"][:, 1:]
    return lean_token_logps(hidden, head, targets, temperature=temperature, with_entropy=with_entropy)


def lean_token_logps(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selective log-softmax through the output head, `chunk_tokens` positions at a time, checkpointed.

    Args:
        hidden: the backbone's last hidden states at the scoring positions. Shape: (B, T, H).
        head: the output projection (hidden -> vocabulary logits).
        targets: the token each position predicts. Shape: (B, T).

    Returns:
        (logps, entropy or None), each of shape (B, T), float32.
    """
    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (B*T, H), (B*T,)
    logps, entropies = [], []
    for start in range(0, flat.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        chunk_logps, chunk_entropy = checkpoint(
            _chunk_logps, flat[chunk], flat_targets[chunk], head, temperature, with_entropy, use_reentrant=False
        )
        logps.append(chunk_logps)
        entropies.append(chunk_entropy)
    shape = targets.shape
    return torch.cat(logps).view(shape), torch.cat(entropies).view(shape) if with_entropy else None


def _chunk_logps(hidden, targets, head, temperature: float, with_entropy: bool):
    logits = head(hidden).float()  # (C, V): the only logits alive at a time
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, -1)  # (C,)
    logps = logits.gather(-1, targets[:, None])[:, 0] - lse
    if not with_entropy:
        return logps, logps.new_zeros(0)
    with torch.no_grad():
        entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return logps, entropy


def _rescales_logits(config) -> bool:
    """Models whose forward transforms the head's output (Gemma's soft-capping, Cohere's scale): no shortcut."""
    return getattr(config, "final_logit_softcapping", None) is not None or hasattr(config, "logit_scale")


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the masked tokens of each sequence.

    Args:
        logits: Shape: (B, T, V).
        input_ids: Shape: (B, T).
        mask: Shape: (B, T); 1 where the token counts (position 0 is ignored: nothing predicts it).

    Returns:
        Shape: (B,).
    """
    assert mask.shape == input_ids.shape, f"mask {tuple(mask.shape)} vs ids {tuple(input_ids.shape)}"
    return masked_logps(token_logps(logits, input_ids), mask)


def masked_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token log-probs over the masked tokens.

    Args:
        token_logps: Shape: (B, T - 1), as `token_logps` / `model_token_logps` return.
        mask: Shape: (B, T), aligned with the input ids (its first column is never scored).

    Returns:
        Shape: (B,).
    """
    assert token_logps.shape[1] == mask.shape[1] - 1, f"logps {tuple(token_logps.shape)} vs mask {tuple(mask.shape)}"
    return (token_logps * mask[:, 1:]).sum(-1)


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    ended: list[bool],
    *,
    eos_id: int,
    pad_id: int,
    batch_size: int,
) -> torch.Tensor:
    """Summed log-prob of each sampled completion (and its EOS, when it ended) under `model`.

    The policy's and the reference's values for the same samples give the Monte-Carlo sequence KL,
    mean(log pi - log ref), used by DPO's `objective/kl`, PPO and evaluation.

    Returns:
        Shape: (N,), on the CPU.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = torch.empty(len(prompt_ids))
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    for index in length_sorted_batches(lengths, batch_size):
        batch = response_batch(
            [prompt_ids[i] for i in index],
            [completion_ids[i] for i in index],
            [ended[i] for i in index],
            eos_id=eos_id,
            pad_id=pad_id,
        )
        input_ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
        logps, _ = model_token_logps(model, input_ids, batch["attention_mask"].to(device))
        result[torch.tensor(index)] = masked_logps(logps, mask).float().cpu()
    model.train(was_training)
    return result


def sequence_kl(
    policy: torch.nn.Module, reference: torch.nn.Module | None, samples, tokenizer, batch_size: int
) -> torch.Tensor:
    """Per-sample log pi(y|x) - log ref(y|x) of completions sampled from `policy`; its mean is the sequence KL.
    `reference` None: the LoRA policy with its adapters disabled.

    Returns:
        Shape: (N,).
    """
    args = (samples.prompt_ids, samples.completion_ids, samples.ended)
    kwargs = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id, "batch_size": batch_size}
    policy_logps = completion_logps(policy, *args, **kwargs)
    with as_reference(policy, reference) as frozen:
        return policy_logps - completion_logps(frozen, *args, **kwargs)
