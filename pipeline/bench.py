"""Throughput and memory benchmarks: each training stage's real code path, and generation, on fixed workloads,
against the machine's peak, and the peak memory of one DPO step at a real vocabulary (`dpo_memory_step`).

Two workloads, fixed so numbers compare across commits and machines, both a GPT-2 of 4 layers, 4 heads, 256 dims,
128 positions, vocabulary 2,000, 2,048 rows, batch 16, fp32:
- `scratch`: the embedded default's model (built in code: fused tanh GELU, dropout 0) on the embedded task's rows
  (~12 prompt + ~14 completion tokens);
- `hub`: the same shape loaded the way a hub checkpoint is, from a `save_pretrained` dir whose config says
  `gelu_new` and dropout 0.1 (each stage applies its own dropout policy: SFT keeps it, the others turn it off), on
  longer rows (~12 prompt + ~35 completion tokens: the completions of two or three reviews).
PPO runs `PPO_ROLLOUTS` rollout batches of 16 prompts with 32 new tokens; generation samples 36 new tokens for
4 batches of each size in `GENERATION_BATCHES`; the opt-in `generation_long` samples 400 new tokens for one batch
of 64 prompts from a 512-position model of the same shape built in code (so the same run on either workload), where
a cache that grew by concatenation would copy itself at every step. Model FLOPs utilisation (MFU) is
6 * params * tokens/s / peak for training (forward + backward), and for PPO counts 2 * params per generated token
and per token of each no-grad scoring pass plus 6 * params per trained token of policy and value model;
generation counts 2 * params per token.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedModel

from pipeline.config import DPOConfig, ModelConfig, PPOConfig, RewardConfig, SFTConfig, TrainerConfig
from pipeline.data.batches import PairCollator, tokenize_pairs, tokenize_rows
from pipeline.data.tokenization import train_bpe_tokenizer
from pipeline.models.build import (
    build_causal_lm,
    build_reward_model,
    compile_backbone,
    count_parameters,
    prepare_for_training,
)
from pipeline.models.generation import SamplingParams, sample_ids
from pipeline.models.judges import VaderJudge
from pipeline.models.reference import attach_reference, reference_logps
from pipeline.tasks.synthetic import generate_reviews
from pipeline.train.dpo import fit_dpo
from pipeline.train.ppo import fit_ppo
from pipeline.train.reward import fit_reward
from pipeline.train.sft import fit_sft
from pipeline.train.trainer import FitResult, peak_rss_mb

ROWS, BATCH, VOCAB, PPO_ROLLOUTS, PPO_PROMPTS, PPO_NEW_TOKENS = 2048, 16, 2000, 8, 16, 32
WORKLOADS = ("scratch", "hub")
STAGES = ("sft", "sft_packed", "reward", "reward_packed", "dpo", "dpo_packed", "ppo", "generation")
# `--stages ...`: SFT under trainer.compile (a warm-up of minutes); generation and PPO under generation.compile
OPT_IN_STAGES = ("sft_compiled", "generation_compiled", "ppo_compiled_sampling", "generation_long")
GENERATION_BATCHES, GENERATION_NEW_TOKENS = (16, 64, 256), 36
LONG_BATCH, LONG_NEW_TOKENS, LONG_POSITIONS = 64, 400, 512
HUB_DROPOUT = 0.1
TRAINER = TrainerConfig(
    accelerator="auto",
    devices=1,
    strategy="auto",
    precision="32-true",
    num_nodes=1,
    log_every_n_steps=50,
    accumulate_grad_batches=1,
    gradient_checkpointing=False,
    compile=False,
    checkpoint_every_n_steps=0,
    keep_checkpoints=False,
)


def _device() -> str:
    """Where the benchmark's own tensors and models go (training follows `TRAINER.accelerator`): the GPU if any."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    """fp32 matmul throughput (GFLOP/s) at torch's current thread count: the peak MFU is measured against."""
    device = _device()
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


def _config(tokenizer, activation: str = "gelu_pytorch_tanh", dropout: float = 0.0, positions: int = 128) -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=positions,
        n_embd=256,
        n_layer=4,
        n_head=4,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        activation_function=activation,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )


@dataclass
class Workload:
    """What one benchmark run trains on: the tokenizer, SFT rows, preference pairs, and for `hub` the model params
    pointing at the `save_pretrained` dir every model is loaded from (None: models are built in code)."""

    kind: str
    tokenizer: object
    rows: list
    pairs: list
    hub: ModelConfig | None = None

    def causal_lm(self, *, disable_dropout: bool) -> PreTrainedModel:
        if self.hub is None:
            return GPT2LMHeadModel(_config(self.tokenizer))
        return prepare_for_training(
            build_causal_lm(self.hub, self.tokenizer),
            self.hub,
            TRAINER,
            disable_dropout=disable_dropout,
            task="CAUSAL_LM",
        )

    def reward_model(self) -> PreTrainedModel:
        if self.hub is None:
            return GPT2ForSequenceClassification(_config(self.tokenizer))
        return prepare_for_training(
            build_reward_model(self.hub, self.tokenizer, self.hub.base),
            self.hub,
            TRAINER,
            disable_dropout=True,
            task="SEQ_CLS",
        )


def _hub_model_config(path: str) -> ModelConfig:
    return ModelConfig(
        base=path,
        trust_remote_code=False,
        n_layer=4,
        n_head=4,
        n_embd=256,
        n_positions=128,
        dropout=HUB_DROPOUT,
        chat_template="none",
        lora_r=0,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
    )


def workload(kind: str, directory: str | Path, seed: int = 0) -> Workload:
    """The fixed rows, pairs and tokenizer of `kind` (see the module docstring); `hub` writes its checkpoint into
    `directory`."""
    if kind not in WORKLOADS:
        raise ValueError(f"bench: unknown workload {kind!r}; valid: {', '.join(WORKLOADS)}")
    reviews = generate_reviews(2 * ROWS + 2, random.Random(seed), frac_positive=0.4, frac_negative=0.4)
    tokenizer = train_bpe_tokenizer([r.prompt + r.completion for r in reviews], vocab_size=VOCAB)
    completions = [r.completion for r in reviews]
    if kind == "hub":  # two or three reviews' completions per row: ~35 tokens
        completions = ["".join(completions[i : i + 2 + (i % 2 == 0)]) for i in range(len(reviews))]
    first, second = range(ROWS), range(ROWS, 2 * ROWS)
    prompts = [reviews[i].prompt for i in first]
    rows = tokenize_rows(tokenizer, prompts, [completions[i] for i in first], 128, "bench")
    import pandas as pd

    frame = pd.DataFrame(
        {
            "prompt": prompts,
            "chosen": [completions[i] for i in first],
            "rejected": [completions[i] for i in second],
            "chosen_gold": [reviews[i].gold for i in first],
            "rejected_gold": [reviews[i].gold for i in second],
        }
    )
    pairs = tokenize_pairs(tokenizer, frame, 128, "bench pairs")
    if kind == "scratch":
        return Workload(kind, tokenizer, rows, pairs)
    torch.manual_seed(seed)
    GPT2LMHeadModel(_config(tokenizer, "gelu_new", HUB_DROPOUT)).save_pretrained(directory, safe_serialization=True)
    return Workload(kind, tokenizer, rows, pairs, _hub_model_config(str(directory)))


def _measured(result: FitResult) -> dict[str, float]:
    summary = result.metrics
    return {
        "wall_s": summary["perf/wall_s"],
        "tokens": summary["perf/tokens"],
        "padding_efficiency": summary["perf/padding_efficiency"],
    }


def _training(packing: bool) -> dict[str, object]:
    """The keys every benchmark training config shares: one epoch of the workload, no validation set."""
    steps = ROWS // BATCH
    return {
        "lr": 1e-4,
        "weight_decay": 0.0,
        "warmup_steps": 10,
        "batch_size": BATCH,
        "max_steps": steps,
        "val_every_n_steps": steps,
        "max_length": 128,
        "grad_clip": 1.0,
        "disable_dropout": True,
        "packing": packing,
    }


def run_stage(stage: str, work: Workload, seed: int = 0) -> dict[str, float]:
    """One benchmark run of `stage` (one of `STAGES`) on `work` through the method's own wiring (`fit_sft`,
    `fit_reward`, `fit_dpo`, `fit_ppo`: what the DVC stages call): wall seconds, tokens, tokens/s, FLOPs and (for
    the training stages) padding efficiency; generation reports tokens/s per batch size."""
    torch.manual_seed(seed)
    pad, eos = work.tokenizer.pad_token_id, work.tokenizer.eos_token_id
    if stage in ("sft", "sft_packed", "sft_compiled"):
        model = work.causal_lm(disable_dropout=False)  # the SFT stage's default policy keeps dropout
        if stage == "sft_compiled":
            compile_backbone(model)
        cfg = SFTConfig(**_training(stage == "sft_packed"), n_samples=0, max_new_tokens=1, on_invalid="fail")
        _, result = fit_sft(model, work.tokenizer, work.rows, [], cfg, TRAINER, seed=seed)
        out = _measured(result)
        out["flops"] = 6 * count_parameters(model) * out["tokens"]
    elif stage in ("reward", "reward_packed"):
        model = work.reward_model()
        cfg = RewardConfig(**_training(stage == "reward_packed"), margin=0.0, center_coef=0.0)
        out = _measured(fit_reward(model, work.tokenizer, work.pairs, [], cfg, TRAINER, seed=seed)[1])
        out["flops"] = 6 * count_parameters(model) * out["tokens"]
    elif stage in ("dpo", "dpo_packed"):
        policy = work.causal_lm(disable_dropout=True)
        reference = work.causal_lm(disable_dropout=True).requires_grad_(False)
        collate = PairCollator(pad, eos, packing=stage == "dpo_packed")
        cached = attach_reference(work.pairs, reference_logps(reference, work.pairs, collate, 64), "bench")
        cfg = DPOConfig(
            **_training(stage == "dpo_packed"),
            loss="sigmoid",
            beta=0.1,
            label_smoothing=0.0,
            simpo_gamma=0.5,
            orpo_lambda=0.1,
            kl_prompts=1,
            max_new_tokens=1,
        )
        out = _measured(fit_dpo(policy, work.tokenizer, cached, [], cfg, TRAINER, seed=seed)[1])
        out["flops"] = 6 * count_parameters(policy) * out["tokens"]
    elif stage in ("ppo", "ppo_compiled_sampling"):
        out = _run_ppo(work, seed, compiled=stage == "ppo_compiled_sampling")
    elif stage in ("generation", "generation_compiled", "generation_long"):
        out = _run_generation(work, seed, compiled=stage == "generation_compiled", long=stage == "generation_long")
    else:
        raise ValueError(f"bench: unknown stage {stage!r}; valid: {', '.join(STAGES + OPT_IN_STAGES)}")
    out["tokens_per_s"] = out["tokens"] / out["wall_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def ppo_config() -> PPOConfig:
    """The benchmark's PPO settings: GAE with a value model, the KL penalty in the reward (the default's method)."""
    return PPOConfig(
        lr=1e-5,
        value_lr=1e-5,
        warmup_rollouts=1,
        rollouts=PPO_ROLLOUTS,
        prompts_per_rollout=PPO_PROMPTS,
        minibatch_size=PPO_PROMPTS,
        ppo_epochs=2,
        max_new_tokens=PPO_NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        kl_coef=0.05,
        kl_estimator="k1",
        kl_control="fixed",
        kl_target=6.0,
        kl_horizon=10000,
        whiten_rewards=False,
        reward_model_weight=1.0,
        judge_weight=0.0,
        reward_clip=10.0,
        missing_eos_penalty=1.0,
        grad_clip=1.0,
        max_ratio=1e9,
        min_eos_rate=0.0,
        n_logged_samples=1,
        disable_dropout=True,
        num_generations=1,
        advantage_estimator="gae",
        kl_in="reward",
        kl_loss_coef=0.05,
    )


def _run_ppo(work: Workload, seed: int, compiled: bool) -> dict[str, float]:
    cfg = ppo_config()
    policy, value = work.causal_lm(disable_dropout=True), work.reward_model()
    reference, reward = work.causal_lm(disable_dropout=True), work.reward_model()
    prompts = [r.prompt_ids for r in work.rows]
    start = time.perf_counter()
    module, _ = fit_ppo(
        policy,
        value,
        reference,
        reward,
        VaderJudge(),
        work.tokenizer,
        prompts,
        cfg,
        TRAINER,
        reward_mean=0.0,
        reward_std=1.0,
        seed=seed,
        compiled_sampling=compiled,
    )
    wall = time.perf_counter() - start
    n = count_parameters(policy)
    generated = sum(h["perf/generated_tokens"] for h in module.history)
    trained = sum(h["perf/trained_tokens"] for h in module.history)
    # generation + four no-grad scoring passes (2N per token) + policy and value updates (6N per token each)
    flops = 2 * n * generated + 4 * 2 * n * trained / cfg.ppo_epochs + 2 * 6 * n * trained
    return {
        "wall_s": wall,
        "tokens": float(generated + trained),
        "flops": float(flops),
        "rollouts_per_s": PPO_ROLLOUTS / wall,
    }


def _run_generation(work: Workload, seed: int, compiled: bool, long: bool = False) -> dict[str, float]:
    """`pipeline.models.generation.sample_ids` (what preferences, PPO rollouts and evaluation call) at each batch size;
    `long`: `LONG_NEW_TOKENS` at `LONG_BATCH` from a `LONG_POSITIONS`-position model."""
    if long:
        model = GPT2LMHeadModel(_config(work.tokenizer, positions=LONG_POSITIONS)).to(_device())
        batches, new_tokens, rounds = (LONG_BATCH,), LONG_NEW_TOKENS, 1
    else:
        model = work.causal_lm(disable_dropout=True).to(_device())
        batches, new_tokens, rounds = GENERATION_BATCHES, GENERATION_NEW_TOKENS, 4
    params = SamplingParams(new_tokens, temperature=1.0, top_k=0, top_p=1.0, compiled=compiled)
    n = count_parameters(model)
    out = {"wall_s": 0.0, "tokens": 0.0, "flops": 0.0}
    for batch in batches:
        prompts = [work.rows[i % len(work.rows)].prompt_ids for i in range(rounds * batch)]
        start = time.perf_counter()
        samples = sample_ids(model, work.tokenizer, prompts, params, batch_size=batch, seed=seed)
        wall = time.perf_counter() - start
        tokens = float(sum(len(c) + e for c, e in zip(samples.completion_ids, samples.ended, strict=True)))
        out[f"tokens_per_s_batch{batch}"] = tokens / wall
        out["wall_s"] += wall
        out["tokens"] += tokens
        out["flops"] += 2 * n * tokens
    return out


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
    `pipeline.models.reference.pair_logps` (chunked selective log-softmax under checkpointing). Run each in its own
    process:
    the figure is the peak RSS above the process's size just before the step (on CUDA, peak allocated memory).
    """
    import psutil
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.losses.dpo import PairLogps, preference_loss
    from pipeline.models.logprobs import sequence_logps
    from pipeline.models.reference import pair_logps

    torch.manual_seed(seed)
    device = _device()
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
    reference, lengths = torch.zeros_like(chosen), torch.ones_like(chosen)
    pair = PairLogps(chosen, rejected, lengths, lengths, reference, reference)
    losses, _, _ = preference_loss(pair, loss="sigmoid", beta=0.1, label_smoothing=0.0)
    losses.mean().backward()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_mb() * 2**20
    return {"peak_mb": (peak - before) / 2**20, "wall_s": wall, "parameters": float(count_parameters(model))}


# `make gpu-check`: the `gpu` preset's DAG at reduced step counts (section -> keys laid over the preset).
GPU_CHECK_OVERRIDES = {
    "trainer": {
        "accelerator": "cuda",
        "precision": "bf16-mixed",
        "checkpoint_every_n_steps": 0,
        "devices": 1,
        "strategy": "auto",
        "num_nodes": 1,
    },
    "prepare": {"n_train": 10000},
    "sft": {"max_steps": 150, "val_every_n_steps": 75},
    "preferences": {"train_prompts": 1024, "val_prompts": 128},
    "reward": {"max_steps": 80, "val_every_n_steps": 40},
    "dpo": {"max_steps": 80, "val_every_n_steps": 40},
    "ppo": {"rollouts": 6},
}
TRAINING_STAGES = ("sft", "reward", "dpo")
"""Stages whose `perf/steady_tokens_per_s` counts training tokens: 6 FLOPs per parameter per token (forward and
backward). PPO's figure mixes sampling and training, so it gets no MFU."""


def bf16_matmul_peak_tflops(n: int = 8192, repeats: int = 50) -> float:
    """The GPU's bf16 matmul throughput (TFLOP/s), the best of 3 timed rounds: what MFU is measured against."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e12


def stage_figures(stage: str, report: dict[str, float], wall_s: float, peak_tflops: float) -> dict[str, float | None]:
    """One stage's line of reports/gpu-check.json from its stage report: steady tokens/s, MFU (training stages),
    peak GPU memory, wall time."""
    tokens_per_s = report.get("perf/steady_tokens_per_s", report.get("perf/tokens_per_s"))
    parameters = report.get("model/parameters")
    mfu = None
    if stage in TRAINING_STAGES and tokens_per_s and parameters:
        mfu = 6 * parameters * tokens_per_s / (peak_tflops * 1e12)
    return {
        "wall_s": wall_s,
        "steady_tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "parameters": parameters,
        "peak_gpu_mem_mb": report.get("perf/peak_gpu_mem_mb"),
    }
