"""The one log-prob helper every stage uses: next-token log-probs of a sequence, masked and summed.

Logits at position t score the token at t + 1, so the shift happens here once. `mask` marks the tokens that
count (the response, in every stage) and is aligned with `input_ids`; its first column is never scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.batches import length_sorted_batches, response_batch
from pipeline.lora import as_reference


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
    result = torch.empty(len(prompt_ids))
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    for index in length_sorted_batches(lengths, batch_size):
        batch = response_batch([prompt_ids[i] for i in index], [completion_ids[i] for i in index],
                               [ended[i] for i in index], eos_id=eos_id, pad_id=pad_id)  # fmt: skip
        input_ids, mask = batch["input_ids"].to(device), batch["loss_mask"].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
        result[torch.tensor(index)] = sequence_logps(logits, input_ids, mask).float().cpu()
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
