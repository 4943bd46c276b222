"""The one log-prob helper every stage uses: next-token log-probs of a sequence, masked and summed.

Logits at position t score the token at t + 1, so the shift happens here once. `mask` marks the tokens that
count (the response, in every stage) and is aligned with `input_ids`; its first column is never scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token.

    Args:
        logits: Shape: (B, T, V).
        input_ids: Shape: (B, T).

    Returns:
        Shape: (B, T - 1); entry t is log p(input_ids[:, t + 1] | input_ids[:, : t + 1]).
    """
    assert logits.shape[:2] == input_ids.shape, f"logits {tuple(logits.shape)} vs ids {tuple(input_ids.shape)}"
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = input_ids[:, 1:]  # (B, T-1)
    # cross_entropy is the fused, memory-light form of log_softmax + gather.
    return -F.cross_entropy(shifted.transpose(1, 2), targets, reduction="none")


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
    return (token_logps(logits, input_ids) * mask[:, 1:]).sum(-1)


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
    out = []
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        ids = [prompt_ids[i] + completion_ids[i] + ([eos_id] if ended[i] else []) for i in index]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        mask = torch.zeros_like(input_ids)
        for row, (i, seq) in enumerate(zip(index, ids, strict=True)):
            input_ids[row, : len(seq)] = torch.as_tensor(seq)
            attention_mask[row, : len(seq)] = 1
            mask[row, len(prompt_ids[i]) : len(seq)] = 1
        input_ids, attention_mask, mask = input_ids.to(device), attention_mask.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        out.append(sequence_logps(logits, input_ids, mask).float().cpu())
    model.train(was_training)
    result = torch.empty(len(order))
    result[torch.tensor(order, dtype=torch.long)] = torch.cat(out) if out else torch.empty(0)
    return result


def sequence_kl(
    policy: torch.nn.Module, reference: torch.nn.Module, samples, tokenizer, batch_size: int
) -> torch.Tensor:
    """Per-sample log pi(y|x) - log ref(y|x) of completions sampled from `policy`; its mean is the sequence KL.

    Returns:
        Shape: (N,).
    """
    args = (samples.prompt_ids, samples.completion_ids, samples.ended)
    kwargs = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id, "batch_size": batch_size}
    return completion_logps(policy, *args, **kwargs) - completion_logps(reference, *args, **kwargs)
