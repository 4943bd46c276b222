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
