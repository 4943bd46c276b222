"""Throughput and memory benchmarks: each training stage's real code path on a fixed workload, against the
machine's peak, and the peak memory of one DPO step at a real vocabulary (`dpo_memory_step`).

The workload is fixed so numbers compare across commits and machines: a scratch GPT-2 (4 layers, 4 heads,
256 dims, 128 positions, vocabulary 2,000), 2,048 rows of the embedded task, batch 16, fp32; PPO runs
`PPO_ROLLOUTS` rollout batches of 16 prompts with 32 new tokens. Model FLOPs utilisation (MFU) is
6 * params * tokens/s / peak for training (forward + backward), and for PPO counts 2 * params per generated
token and per token of each no-grad scoring pass plus 6 * params per trained token of policy and value model.
"""

from __future__ import annotations

import random
import time

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from pipeline.batches import PairCollator, RowsDataModule, SFTCollator, tokenize_pairs, tokenize_rows
from pipeline.config import PPOConfig, TrainerConfig
from pipeline.dpo import DPOModule, attach_reference, reference_logps
from pipeline.judges import VaderJudge
from pipeline.models import count_parameters
from pipeline.ppo import PPOModule, PromptBatches
from pipeline.reward import RewardModule
from pipeline.sft import SFTModule
from pipeline.synthetic import generate_reviews
from pipeline.tokenization import train_bpe_tokenizer
from pipeline.training import Throughput, build_trainer, peak_rss_mb

ROWS, BATCH, VOCAB, PPO_ROLLOUTS, PPO_PROMPTS, PPO_NEW_TOKENS = 2048, 16, 2000, 8, 16, 32
TRAINER = TrainerConfig(accelerator="auto", devices=1, strategy="auto", precision="32-true", num_nodes=1,
                        log_every_n_steps=50, accumulate_grad_batches=1, gradient_checkpointing=False,
                        checkpoint_every_n_steps=0, keep_checkpoints=False)  # fmt: skip


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    """fp32 matmul throughput (GFLOP/s) at torch's current thread count: the peak MFU is measured against."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(3):
        (a @ b).sum().item()
        start = time.perf_counter()
        for _ in range(repeats):
            c = a @ b
        c.sum().item()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e9


def _config(tokenizer) -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=256,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_pytorch_tanh",
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )


def workload(seed: int = 0):
    """The fixed rows, pairs and tokenizer every benchmark run uses."""
    reviews = generate_reviews(2 * ROWS, random.Random(seed), frac_positive=0.4, frac_negative=0.4)
    tokenizer = train_bpe_tokenizer([r.prompt + r.completion for r in reviews], vocab_size=VOCAB)
    first, second = reviews[:ROWS], reviews[ROWS:]
    rows = tokenize_rows(tokenizer, [r.prompt for r in first], [r.completion for r in first], 128, "bench")
    import pandas as pd

    frame = pd.DataFrame(
        {
            "prompt": [r.prompt for r in first],
            "chosen": [r.completion for r in first],
            "rejected": [r.completion for r in second],
            "chosen_gold": [r.gold for r in first],
            "rejected_gold": [r.gold for r in second],
        }
    )
    return tokenizer, rows, tokenize_pairs(tokenizer, frame, 128, "bench pairs")


def _fit(module, data, steps: int) -> dict[str, float]:
    throughput = Throughput()
    trainer = build_trainer(TRAINER, max_steps=steps, val_every_n_steps=None, grad_clip=1.0, logger=False,
                            callbacks=[throughput], max_epochs=1)  # fmt: skip
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    return {"wall_s": throughput.summary["perf/wall_s"], "tokens": throughput.summary["perf/tokens"]}


def run_stage(stage: str, tokenizer, rows, pairs, seed: int = 0) -> dict[str, float]:
    """One benchmark run of `stage` (sft, reward, dpo or ppo): wall seconds, tokens, tokens/s and FLOPs."""
    torch.manual_seed(seed)
    config, steps = _config(tokenizer), ROWS // BATCH
    optim = {"lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 10, "max_steps": steps}
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if stage == "sft":
        model = GPT2LMHeadModel(config)
        out = _fit(SFTModule(model, **optim), RowsDataModule(rows, [], SFTCollator(pad, eos), BATCH, seed), steps)
        out["flops"] = 6 * count_parameters(model) * out["tokens"]
    elif stage == "reward":
        model = GPT2ForSequenceClassification(config)
        module = RewardModule(model, margin=0.0, center_coef=0.0, **optim)
        out = _fit(module, RowsDataModule(pairs, [], PairCollator(pad, eos), BATCH, seed), steps)
        out["flops"] = 6 * count_parameters(model) * out["tokens"]
    elif stage == "dpo":
        policy = GPT2LMHeadModel(config)
        reference = GPT2LMHeadModel(config).requires_grad_(False)
        cached = attach_reference(pairs, reference_logps(reference, pairs, PairCollator(pad, eos), 64), "bench")
        module = DPOModule(policy, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, **optim)
        out = _fit(module, RowsDataModule(cached, [], PairCollator(pad, eos), BATCH, seed), steps)
        out["flops"] = 6 * count_parameters(policy) * out["tokens"]
    elif stage == "ppo":
        out = _run_ppo(config, tokenizer, rows, seed)
    else:
        raise ValueError(f"bench: unknown stage {stage!r}; valid: sft, reward, dpo, ppo")
    out["tokens_per_s"] = out["tokens"] / out["wall_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _run_ppo(config: GPT2Config, tokenizer, rows, seed: int) -> dict[str, float]:
    cfg = PPOConfig(
        lr=1e-5, value_lr=1e-5, warmup_rollouts=1, rollouts=PPO_ROLLOUTS, prompts_per_rollout=PPO_PROMPTS,
        minibatch_size=PPO_PROMPTS, ppo_epochs=2, max_new_tokens=PPO_NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
        gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, kl_coef=0.05, kl_estimator="k1",
        kl_control="fixed", kl_target=6.0, kl_horizon=10000, whiten_rewards=False, reward_clip=10.0,
        missing_eos_penalty=1.0, grad_clip=1.0, max_ratio=1e9, min_eos_rate=0.0, n_logged_samples=1,
        disable_dropout=True,
    )  # fmt: skip
    policy, value = GPT2LMHeadModel(config), GPT2ForSequenceClassification(config)
    module = PPOModule(policy, value, GPT2LMHeadModel(config), GPT2ForSequenceClassification(config), VaderJudge(),
                       tokenizer, cfg, reward_mean=0.0, reward_std=1.0, seed=seed)  # fmt: skip
    prompts = [r.prompt_ids for r in rows]
    loader = DataLoader(prompts, batch_sampler=PromptBatches(len(prompts), PPO_PROMPTS, PPO_ROLLOUTS, seed),
                        collate_fn=list)  # fmt: skip
    trainer = build_trainer(TRAINER, max_steps=-1, max_epochs=1, val_every_n_steps=None, grad_clip=0.0, logger=False)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    wall = time.perf_counter() - start
    n = count_parameters(policy)
    generated = sum(h["perf/generated_tokens"] for h in module.history)
    trained = sum(h["perf/trained_tokens"] for h in module.history)
    # generation + four no-grad scoring passes (2N per token) + policy and value updates (6N per token each)
    flops = 2 * n * generated + 4 * 2 * n * trained / cfg.ppo_epochs + 2 * 6 * n * trained
    return {"wall_s": wall, "tokens": float(generated + trained), "flops": float(flops)}


def summarize(runs: list[dict[str, float]], peak_gflops: float) -> dict[str, float]:
    """Median of the runs (after the warm-up), with MFU against `peak_gflops`."""
    median = {key: float(torch.tensor([r[key] for r in runs]).median()) for key in runs[0]}
    median["mfu"] = median["flops"] / median["wall_s"] / (peak_gflops * 1e9)
    return median


MEMORY_VOCAB, MEMORY_TOKENS, MEMORY_PAIRS = 151_936, 512, 4


def dpo_memory_step(lean: bool, seed: int = 0) -> dict[str, float]:
    """Peak memory of one DPO training step (forward, loss, backward) at Qwen2.5's vocabulary: 4 pairs x 512
    tokens on a 2-layer, 128-wide Llama (39 M parameters, nearly all in the embeddings and head).

    `lean` False is the path before the memory work (full logits, a float32 log-softmax of them); True is
    `pipeline.dpo.pair_logps` (chunked selective log-softmax under checkpointing). Run each in its own process:
    the figure is the peak RSS above the process's size just before the step (on CUDA, peak allocated memory).
    """
    import psutil
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.dpo import pair_logps
    from pipeline.dpo_losses import dpo_loss
    from pipeline.logprobs import sequence_logps

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(vocab_size=MEMORY_VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, MEMORY_VOCAB, (2 * MEMORY_PAIRS, MEMORY_TOKENS), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    batch["loss_mask"][:, : MEMORY_TOKENS // 4] = 0  # a prompt quarter, as in a pair batch
    before = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    if lean:
        chosen, rejected = pair_logps(model, batch)
    else:
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        chosen, rejected = sequence_logps(logits, ids, batch["loss_mask"]).chunk(2)
    reference = torch.zeros_like(chosen)
    losses, _, _ = dpo_loss(chosen, rejected, reference, reference, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    losses.mean().backward()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_mb() * 2**20
    return {"peak_mb": (peak - before) / 2**20, "wall_s": wall, "parameters": float(count_parameters(model))}
