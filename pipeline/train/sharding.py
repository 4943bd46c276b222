"""`trainer.strategy: fsdp`: fully sharded data parallel training, as FSDP2 (`torch.distributed.fsdp.fully_shard`)
under Lightning's `ModelParallelStrategy`.

Why FSDP2 and not Lightning's `FSDPStrategy` (FSDP1): FSDP1 refuses the CPU (torch 2.13: "FSDP needs a non-CPU
accelerator device"; Lightning's `FSDPStrategy` also demands CUDA), while FSDP2 runs on the CPU with gloo and on
GPUs with NCCL, is the FSDP PyTorch maintains, keeps parameter names (a sharded model saves and loads like a plain
one), shards parameter by parameter (LoRA's frozen base weights and trainable adapters share a unit), and can run a
method other than `forward` under a unit's hooks (`register_fsdp_forward_method`). The chunked log-prob path and the
packed reward scores need that: they call the backbone and the output head directly, which would bypass the root
unit's gather of the embeddings and head; they go through `pipeline.models.lora.root_call` instead.

Each transformer block (the classes in the model's `_no_split_modules`) is one unit, the rest of the model (the
embeddings, final norm and heads) the root unit. When training ends, `gather` collects the full weights onto rank 0
into an unsharded copy of the model, which is what rank 0 samples from and saves.
"""

from __future__ import annotations

import copy
import functools

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy

from pipeline.config import ConfigError, TrainerConfig
from pipeline.models.lora import ROOT_CALL, unwrapped

FSDP = "fsdp"


def build_strategy(cfg: TrainerConfig) -> str | ModelParallelStrategy:
    """The Lightning strategy for `cfg.strategy`: FSDP2 for `fsdp`, Lightning's own name otherwise."""
    if cfg.strategy != FSDP:
        return cfg.strategy
    if not isinstance(cfg.devices, int):
        raise ConfigError(
            f"trainer.devices: {cfg.devices!r} with trainer.strategy: fsdp; give the number of devices "
            "(processes) per node, e.g. trainer.devices: 2"
        )
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
    return ModelParallelStrategy(
        data_parallel_size=cfg.devices * cfg.num_nodes,  # every process holds a shard: no tensor parallelism
        tensor_parallel_size=1,
        process_group_backend="gloo" if on_cpu else None,
        save_distributed_checkpoint=False,  # mid-stage checkpoints stay single files, as under DDP
    )


def shard(module: pl.LightningModule) -> None:
    """A training module's `configure_model`: under FSDP, shard each model it trains (a no-op otherwise).

    Rank 0 keeps an unsharded copy of each (host memory: one model) for `gather` to load the trained weights into.
    """
    mesh = module.device_mesh
    if mesh is None or getattr(module, "_unsharded", None) is not None:  # Lightning calls it again for `validate`
        return
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    templates = {}
    for name, model in _models(module):
        if module.global_rank == 0:
            templates[name] = copy.deepcopy(model)
        blocks = set(getattr(unwrapped(model), "_no_split_modules", None) or ())
        for part in model.modules():
            if type(part).__name__ in blocks:
                fully_shard(part, mesh=mesh)
        fully_shard(model, mesh=mesh)
        setattr(model, ROOT_CALL, functools.partial(_call, model))
        register_fsdp_forward_method(model, ROOT_CALL)
    module._unsharded = templates  # empty on ranks > 0


def gather(module: pl.LightningModule) -> None:
    """After training, on every rank (the gather is collective): rank 0's module gets back plain models holding the
    trained weights, on the module's device; the other ranks keep their shards."""
    if getattr(module, "_unsharded", None) is None:
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for name, model in _models(module):
        weights = get_model_state_dict(model, options=options)
        if module.global_rank == 0:
            plain = module._unsharded[name]
            plain.load_state_dict(weights)
            setattr(module, name, plain.to(module.device))
    module._unsharded = None


def _models(module: pl.LightningModule) -> list[tuple[str, torch.nn.Module]]:
    """The models a training module holds as attributes (policy, value model, reward model...)."""
    return [(name, child) for name, child in module.named_children() if any(True for _ in child.parameters())]


def _call(model: torch.nn.Module, fn, *args, **kwargs):
    return fn(model, *args, **kwargs)
