"""`python -m tests.sharded_fit`: fit sft or dpo through the stages' own `fit_sft` / `fit_dpo` on synthetic rows, in
one process or under a multi-process strategy (Lightning's launcher re-runs this script per rank), and write what
tests/integration/test_fsdp.py compares: the loss of every step averaged over the ranks, and the final weights.

With `--checkpoints DIR --die-at RANK:STEP` it writes mid-stage checkpoints every 2 steps, and process `RANK` kills
itself (SIGKILL) in the middle of writing the one of step `STEP` (while the ranks gather the checkpoint's state).

The model has a 32,768-token vocabulary, so its log-probs take the chunked path (backbone, then the output head a
chunk at a time, under checkpointing); `--lora` puts adapters on it. Every row has the same length and the train set
is exactly one effective batch, so each step sees the same rows, with the same token weight per row, whether one
process takes all of them or each rank takes its share: the runs must agree up to floating-point reduction order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.config import load_config, read_params
from pipeline.data.batches import PairCollator, PreferencePair, PromptCompletion
from pipeline.models.build import prepare_for_training
from pipeline.models.logprobs import LEAN_MIN_VOCAB
from pipeline.models.reference import attach_reference, reference_logps
from pipeline.train.dpo import fit_dpo
from pipeline.train.hooks import Hooks
from pipeline.train.sft import fit_sft
from stages.checkpoints import Checkpoints
from tests.defaults import ROOT

STEPS, ROWS = 4, 8


class StepLosses(pl.Callback):
    """Each step's training loss, averaged over the ranks (a collective: every rank calls it)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sharded = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.sharded = any(isinstance(child, FSDPModule) for child in pl_module.children())
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(trainer.strategy.reduce(loss.detach(), reduce_op="mean")))


class DiesMidCheckpoint(pl.Callback):
    """Process `rank` kills itself while the checkpoint of step `step` is being written: Lightning asks every callback
    for its state then, on every rank, while the ranks gather the checkpoint."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step
        self._trainer = None

    def setup(self, trainer, pl_module, stage) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        if self._trainer.global_rank == self.rank and self._trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=("sft", "dpo"), required=True)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints")
    parser.add_argument("--die-at", default="-1:-1", help="RANK:STEP")
    args = parser.parse_args()
    cfg = load_config(read_params(ROOT / "params.yaml"))
    trainer = dataclasses.replace(
        cfg.trainer,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        precision="32-true",
        num_nodes=1,
        accumulate_grad_batches=1,
        log_every_n_steps=1,
        gradient_checkpointing=False,
        compile=False,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=LEAN_MIN_VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=64))
    model = prepare_for_training(
        model,
        dataclasses.replace(cfg.model, lora_r=4 if args.lora else 0),
        trainer,
        disable_dropout=True,
        task="CAUSAL_LM",
    )
    generator = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, LEAN_MIN_VOCAB, (n,), generator=generator).tolist()

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    batch_size = ROWS // args.devices  # the same effective batch: the whole train set, every step
    losses = StepLosses()
    hooks = Hooks(callbacks=[losses])
    if args.checkpoints:
        die_rank, die_step = map(int, args.die_at.split(":"))
        folder = Checkpoints(Path(args.checkpoints), every_n=2, keep=True)
        hooks = Hooks(checkpoints=folder, callbacks=[DiesMidCheckpoint(die_rank, die_step)])
    if args.method == "sft":
        rows = [PromptCompletion(tokens(6), tokens(10)) for _ in range(ROWS)]
        sft = dataclasses.replace(
            cfg.sft,
            batch_size=batch_size,
            max_steps=STEPS,
            val_every_n_steps=STEPS,
            warmup_steps=0,
            lr=1e-2,
            packing=False,
        )
        module, result = fit_sft(model, tokenizer, rows, rows[:4], sft, trainer, seed=0, hooks=hooks)
        trained = module.model
    else:
        pairs = [PreferencePair(tokens(6), tokens(8), tokens(8), index=i) for i in range(ROWS)]
        collate = PairCollator(tokenizer.pad_token_id, tokenizer.eos_token_id)
        pairs = attach_reference(pairs, reference_logps(model, pairs, collate, ROWS), "synthetic pairs")
        dpo = dataclasses.replace(
            cfg.dpo,
            batch_size=batch_size,
            max_steps=STEPS,
            val_every_n_steps=STEPS,
            warmup_steps=0,
            lr=1e-2,
            packing=False,
            loss="sigmoid",
        )
        module, result = fit_dpo(model, tokenizer, pairs, pairs[:4], dpo, trainer, seed=0, hooks=hooks)
        trained = module.policy
    if not result.is_global_zero:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().contiguous() for name, p in trained.named_parameters()}
    save_file(weights, out / "weights.safetensors")
    (out / "run.json").write_text(
        json.dumps({"losses": losses.losses, "metrics": result.metrics, "sharded": losses.sharded})
    )


if __name__ == "__main__":
    main()
