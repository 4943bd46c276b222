"""LoRA through `peft`, and the one-copy reference it allows.

With `model.lora_r > 0` every trained stage wraps its model in low-rank adapters on the linear layers of the blocks
(`lora_target_modules`, default every linear layer but the output head); a reward or value model also trains its
fresh score head in full. What a stage writes is the *merged* model, a plain self-contained `save_pretrained`
directory, so the next stage (and a user) loads it like any checkpoint and puts new adapters on top.

Because the policy starts from the reference's weights, the reference is the policy with its adapters disabled
(`as_reference`): DPO's final sampling and PPO hold one copy of the policy weights, not two.

`peft` is imported only when adapters are made (importing it costs about 3 s of every stage's start): a model can
be a `PeftModel` only once `peft` is loaded, so the checks below look it up in `sys.modules` instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from pipeline.config import ModelConfig


def with_lora(model: torch.nn.Module, cfg: ModelConfig, *, task: str) -> torch.nn.Module:
    """`model` with trainable LoRA adapters (base weights frozen), or `model` itself when `cfg.lora_r` is 0.

    Args:
        task: `CAUSAL_LM`, or `SEQ_CLS` (the score head is then trained in full alongside the adapters).
    """
    if not cfg.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else [name.strip() for name in targets.split(",")],
        task_type=task,
        modules_to_save=["score"] if task == "SEQ_CLS" else None,
    )
    return get_peft_model(model, config)


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped in PEFT adapters (without importing `peft` when nothing loaded it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with the adapters folded into its weights (what a stage saves); `model` if it has none."""
    return model.merge_and_unload() if has_adapters(model) else model


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a PEFT wrapper (its LoRA layers still in place), or `model` itself."""
    return model.get_base_model() if has_adapters(model) else model


ROOT_CALL = "align_root_call"
"""Where `pipeline.train.sharding` puts a sharded model's entry point for `root_call`."""


def root_call(model: torch.nn.Module, fn, *args, **kwargs):
    """`fn(model, *args, **kwargs)`, run as a forward of `model`. For code that calls parts of a model (its
    `backbone`, a head) instead of the model: under FSDP the root's parameters (embeddings, heads) are sharded and are
    gathered, and their gradients reduced, only around a forward of the root."""
    call = model.__dict__.get(ROOT_CALL)
    return call(fn, *args, **kwargs) if call is not None else fn(model, *args, **kwargs)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (`transformer`, `model`, `gpt_neox`: the model's `base_model_prefix`) of a causal LM or
    sequence classifier, under LoRA too: its hidden states without the output or score head."""
    base = unwrapped(model)
    return getattr(base, base.base_model_prefix)


@contextlib.contextmanager
def as_reference(policy: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The reference model to run: `reference` when there is one, else the LoRA policy with its adapters off."""
    if reference is not None:
        yield reference
        return
    if not has_adapters(policy):
        raise ValueError("no reference model given and the policy has no adapters to disable (model.lora_r is 0)")
    with policy.disable_adapter():
        yield policy


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    """`model/parameters` (all) and `model/trainable_parameters`, for reports and MLflow."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model/parameters": float(total), "model/trainable_parameters": float(trainable)}
