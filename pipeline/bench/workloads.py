"""Throughput: each training stage's real code path (`fit_sft`, `fit_reward`, `fit_dpo`, `fit_ppo`: what the DVC
stages call), and generation, on fixed workloads, against the machine's peak.

Every config is the loaded params (`params.yaml`, passed in by the caller) with the bench's overrides laid over
them (`OVERRIDES`, `bench_config`) and validated as any params file is: the overrides pin what shapes the workload
(model size, precision, batch, steps, lengths, PPO's sampling), the rest is the product's own. Two workloads, fixed
so numbers compare across commits and machines, both a GPT-2 of 4 layers, 4 heads, 256 dims, 128 positions,
vocabulary 2,000, 2,048 rows, batch 16, fp32:
- `scratch`: the embedded default's model (`model.base: scratch`: fused tanh GELU, dropout 0) on the embedded
  task's rows (~12 prompt + ~14 completion tokens);
- `hub`: the same shape loaded the way a hub checkpoint is, from a `save_pretrained` dir whose config says
  `gelu_new` and dropout 0.1 (each stage applies its own dropout policy: SFT keeps it, the others turn it off), on
  longer rows (~12 prompt + ~35 completion tokens: the completions of two or three reviews).
Reward and value models load from the workload's `save_pretrained` dir, as the reward stage loads `models/sft`.
PPO runs `PPO_ROLLOUTS` rollout batches of 16 prompts with 32 new tokens; generation samples 36 new tokens for
4 batches of each size in `GENERATION_BATCHES`; the opt-in `generation_long` samples 400 new tokens for one batch
of 64 prompts from a 512-position scratch model of the same shape (so the same run on either workload), where
a cache that grew by concatenation would copy itself at every step. Model FLOPs utilisation (MFU) is
6 * params * tokens/s / peak for training (forward + backward), and for PPO counts 2 * params per generated token
and per token of each no-grad scoring pass plus 6 * params per trained token of policy and value model;
generation counts 2 * params per token.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from pipeline.config import Config, load_config
from pipeline.data.batches import PairCollator, tokenize_pairs, tokenize_rows
from pipeline.data.tokenization import train_bpe_tokenizer
from pipeline.envs.base import Step
from pipeline.envs.episodes import Budgets, run_episodes
from pipeline.models.build import (
    build_causal_lm,
    build_reward_model,
    compile_backbone,
    count_parameters,
    prepare_for_training,
)
from pipeline.models.generation import Samples, SamplingParams, sample_ids
from pipeline.models.judges import VaderJudge
from pipeline.models.reference import attach_reference, reference_logps
from pipeline.tasks.synthetic import generate_reviews
from pipeline.train.dpo import fit_dpo
from pipeline.train.ppo import fit_ppo
from pipeline.train.reward import fit_reward
from pipeline.train.sft import fit_sft
from pipeline.train.trainer import FitResult, peak_rss_mb

ROWS, BATCH, VOCAB, PPO_ROLLOUTS = 2048, 16, 2000, 8
WORKLOADS = ("scratch", "hub")
STAGES = ("sft", "sft_packed", "reward", "reward_packed", "dpo", "dpo_packed", "ppo", "generation", "episodes")
# `--stages ...`: SFT under trainer.compile (a warm-up of minutes); generation and PPO under generation.compile
OPT_IN_STAGES = ("sft_compiled", "generation_compiled", "ppo_compiled_sampling", "generation_long")
GENERATION_BATCHES, GENERATION_NEW_TOKENS = (16, 64, 256), 36
# `episodes`: 64 episodes of 4 turns (each ends on a tenth of the vocabulary, ~10 tokens), a 3-token observation
# between turns, against one turn of the same total length per row: what multi-turn sampling costs at equal tokens
# (an environment answering every turn, rows of different lengths, a batch every row of which has the same length).
EPISODE_ROWS, EPISODE_TURNS, EPISODE_TURN_TOKENS, EPISODE_TOTAL = 64, 4, 24, 96
LONG_BATCH, LONG_NEW_TOKENS, LONG_POSITIONS = 64, 400, 512
HUB_DROPOUT = 0.1

# What the bench lays over the loaded params, section -> keys. `training` goes to sft, reward and dpo alike; their
# step counts (one epoch of the workload's rows) and `packing` are set per run (`bench_config`).
OVERRIDES: dict[str, dict[str, Any]] = {
    "trainer": {
        "accelerator": "auto",
        "devices": 1,
        "strategy": "auto",
        "num_nodes": 1,
        "precision": "32-true",
        "accumulate_grad_batches": 1,
        "gradient_checkpointing": False,
        "compile": False,
        "log_every_n_steps": 50,
        "checkpoint_every_n_steps": 0,
    },
    "model": {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 128, "lora_r": 0, "chat_template": "none"},
    "training": {"lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 10, "batch_size": BATCH, "max_length": 128},
    "sft": {"n_samples": 0, "max_new_tokens": 1},
    "reward": {"margin": 0.0, "center_coef": 0.0},
    "dpo": {"loss": "sigmoid", "beta": 0.1, "kl_prompts": 1, "max_new_tokens": 1},
    "reference": {"max_length": 128},  # the pairs DPO trains on (a rule of the params)
    "ppo": {
        "lr": 1e-5,
        "value_lr": 1e-5,
        "warmup_rollouts": 1,
        "prompts_per_rollout": 16,
        "minibatch_size": 16,
        "ppo_epochs": 2,
        "num_generations": 1,
        "advantage_estimator": "gae",
        "kl_in": "reward",
        "max_new_tokens": 32,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "reward_model_weight": 1.0,
        "judge_weight": 0.0,
        "max_ratio": 1e9,
        "min_eos_rate": 0.0,
        "n_logged_samples": 1,
    },
}


def _device() -> str:
    """Where the benchmark's own tensors and models go (training follows `trainer.accelerator`): the GPU if any."""
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


@dataclass
class Workload:
    """What one benchmark run trains on: the tokenizer, SFT rows, preference pairs, the loaded params the configs
    start from, the `model` keys of this workload, and the `save_pretrained` dir reward and value models load from
    (`hub`: every model)."""

    kind: str
    tokenizer: object
    rows: list
    pairs: list
    params: Mapping[str, Any]
    model: dict[str, Any]
    checkpoint: str
    rollouts: int = PPO_ROLLOUTS

    def config(self, *, packing: bool = False) -> Config:
        return bench_config(
            self.params, self.model, steps=len(self.rows) // BATCH, packing=packing, rollouts=self.rollouts
        )

    def causal_lm(self, config: Config, *, disable_dropout: bool) -> PreTrainedModel:
        model = build_causal_lm(config.model, self.tokenizer)
        return prepare_for_training(
            model, config.model, config.trainer, disable_dropout=disable_dropout, task="CAUSAL_LM"
        )

    def reward_model(self, config: Config) -> PreTrainedModel:
        model = build_reward_model(config.model, self.tokenizer, self.checkpoint)
        return prepare_for_training(model, config.model, config.trainer, disable_dropout=True, task="SEQ_CLS")


def bench_config(
    params: Mapping[str, Any], model: Mapping[str, Any], *, steps: int, packing: bool, rollouts: int
) -> Config:
    """`params` with `OVERRIDES`, the workload's `model` keys, one epoch of `steps` (validated at its end) and
    `packing` for the supervised stages, and `rollouts` for PPO laid over them; validated by `load_config`."""
    raw = copy.deepcopy(dict(params))
    training = {**OVERRIDES["training"], "max_steps": steps, "val_every_n_steps": steps, "packing": packing}
    layers = {section: values for section, values in OVERRIDES.items() if section != "training"}
    layers["model"] = {**layers["model"], **model}
    layers["ppo"] = {**layers["ppo"], "rollouts": rollouts}
    for section in ("sft", "reward", "dpo"):
        layers[section] = {**training, **layers[section]}
    for section, values in layers.items():
        raw[section] = {**raw[section], **values}
    return load_config(raw)


def workload(
    kind: str, directory: str | Path, params: Mapping[str, Any], *, seed: int = 0, rows: int = ROWS
) -> Workload:
    """The fixed rows, pairs and tokenizer of `kind` (see the module docstring) over the loaded `params`; the
    workload's checkpoint is written into `directory`."""
    if kind not in WORKLOADS:
        raise ValueError(f"bench: unknown workload {kind!r}; valid: {', '.join(WORKLOADS)}")
    reviews = generate_reviews(2 * rows + 2, random.Random(seed), frac_positive=0.4, frac_negative=0.4)
    tokenizer = train_bpe_tokenizer([r.prompt + r.completion for r in reviews], vocab_size=VOCAB)
    completions = [r.completion for r in reviews]
    if kind == "hub":  # two or three reviews' completions per row: ~35 tokens
        completions = ["".join(completions[i : i + 2 + (i % 2 == 0)]) for i in range(len(reviews))]
    first, second = range(rows), range(rows, 2 * rows)
    prompts = [reviews[i].prompt for i in first]
    train_rows = tokenize_rows(tokenizer, prompts, [completions[i] for i in first], 128, "bench")
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
    torch.manual_seed(seed)
    if kind == "scratch":
        model = {"base": "scratch", "dropout": 0.0}
        config = bench_config(params, model, steps=1, packing=False, rollouts=1)
        build_causal_lm(config.model, tokenizer).save_pretrained(directory, safe_serialization=True)
    else:
        model = {"base": str(directory), "dropout": HUB_DROPOUT}
        hub = GPT2Config(
            vocab_size=VOCAB,
            n_positions=128,
            n_embd=256,
            n_layer=4,
            n_head=4,
            resid_pdrop=HUB_DROPOUT,
            embd_pdrop=HUB_DROPOUT,
            attn_pdrop=HUB_DROPOUT,
            activation_function="gelu_new",
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        GPT2LMHeadModel(hub).save_pretrained(directory, safe_serialization=True)
    return Workload(kind, tokenizer, train_rows, pairs, params, model, str(directory))


def _measured(result: FitResult) -> dict[str, float]:
    summary = result.metrics
    return {
        "wall_s": summary["perf/wall_s"],
        "tokens": summary["perf/tokens"],
        "padding_efficiency": summary["perf/padding_efficiency"],
    }


def run_stage(stage: str, work: Workload, seed: int = 0) -> dict[str, float]:
    """One benchmark run of `stage` (one of `STAGES`) on `work` through the method's own wiring (`fit_sft`,
    `fit_reward`, `fit_dpo`, `fit_ppo`: what the DVC stages call): wall seconds, tokens, tokens/s, FLOPs and (for
    the training stages) padding efficiency; generation reports tokens/s per batch size."""
    torch.manual_seed(seed)
    config = work.config(packing=stage.endswith("_packed"))
    if stage in ("sft", "sft_packed", "sft_compiled"):
        model = work.causal_lm(config, disable_dropout=config.sft.disable_dropout)
        if stage == "sft_compiled":
            compile_backbone(model)
        _, result = fit_sft(model, work.tokenizer, work.rows, [], config.sft, config.trainer, seed=seed)
        out = _measured(result)
        out["flops"] = 6 * count_parameters(model) * out["tokens"]
    elif stage in ("reward", "reward_packed"):
        model = work.reward_model(config)
        _, result = fit_reward(model, work.tokenizer, work.pairs, [], config.reward, config.trainer, seed=seed)
        out = _measured(result)
        out["flops"] = 6 * count_parameters(model) * out["tokens"]
    elif stage in ("dpo", "dpo_packed"):
        policy = work.causal_lm(config, disable_dropout=config.dpo.disable_dropout)
        reference = work.causal_lm(config, disable_dropout=True).requires_grad_(False)
        collate = PairCollator(work.tokenizer.pad_token_id, work.tokenizer.eos_token_id, packing=config.dpo.packing)
        cached = attach_reference(work.pairs, reference_logps(reference, work.pairs, collate, 64), "bench")
        _, result = fit_dpo(policy, work.tokenizer, cached, [], config.dpo, config.trainer, seed=seed)
        out = _measured(result)
        out["flops"] = 6 * count_parameters(policy) * out["tokens"]
    elif stage in ("ppo", "ppo_compiled_sampling"):
        out = _run_ppo(work, config, seed, compiled=stage == "ppo_compiled_sampling")
    elif stage == "episodes":
        out = _run_episodes(work, config, seed)
    elif stage in ("generation", "generation_compiled", "generation_long"):
        out = _run_generation(
            work, config, seed, compiled=stage == "generation_compiled", long=stage == "generation_long"
        )
    else:
        raise ValueError(f"bench: unknown stage {stage!r}; valid: {', '.join(STAGES + OPT_IN_STAGES)}")
    out["tokens_per_s"] = out["tokens"] / out["wall_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _run_ppo(work: Workload, config: Config, seed: int, compiled: bool) -> dict[str, float]:
    policy = work.causal_lm(config, disable_dropout=config.ppo.disable_dropout)
    reference = work.causal_lm(config, disable_dropout=True)
    value, reward = work.reward_model(config), work.reward_model(config)
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
        config.ppo,
        config.trainer,
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
    flops = 2 * n * generated + 4 * 2 * n * trained / config.ppo.ppo_epochs + 2 * 6 * n * trained
    return {
        "wall_s": wall,
        "tokens": float(generated + trained),
        "flops": float(flops),
        "rollouts_per_s": config.ppo.rollouts / wall,
    }


def sampled_tokens(samples: Samples) -> float:
    """The tokens a sampling call drew: every completion's, and the EOS of each that ended."""
    return float(sum(len(c) + e for c, e in zip(samples.completion_ids, samples.ended, strict=True)))


def _run_generation(work: Workload, config: Config, seed: int, compiled: bool, long: bool = False) -> dict[str, float]:
    """`pipeline.models.generation.sample_ids` (what preferences, PPO rollouts and evaluation call) at each batch size;
    `long`: `LONG_NEW_TOKENS` at `LONG_BATCH` from a `LONG_POSITIONS`-position scratch model."""
    if long:
        scratch = dataclasses.replace(config.model, base="scratch", dropout=0.0, n_positions=LONG_POSITIONS)
        model = build_causal_lm(scratch, work.tokenizer).to(_device())
        batches, new_tokens, rounds = (LONG_BATCH,), LONG_NEW_TOKENS, 1
    else:
        model = work.causal_lm(config, disable_dropout=True).to(_device())
        batches, new_tokens, rounds = GENERATION_BATCHES, GENERATION_NEW_TOKENS, 4
    params = SamplingParams(new_tokens, temperature=1.0, top_k=0, top_p=1.0, compiled=compiled)
    n = count_parameters(model)
    out = {"wall_s": 0.0, "tokens": 0.0, "flops": 0.0}
    for batch in batches:
        prompts = [work.rows[i % len(work.rows)].prompt_ids for i in range(rounds * batch)]
        start = time.perf_counter()
        samples = sample_ids(model, work.tokenizer, prompts, params, batch_size=batch, seed=seed)
        wall = time.perf_counter() - start
        tokens = sampled_tokens(samples)
        out[f"tokens_per_s_batch{batch}"] = tokens / wall
        out["wall_s"] += wall
        out["tokens"] += tokens
        out["flops"] += 2 * n * tokens
    return out


class _Echo:
    """The bench's environment: never done, answers every turn with the same short observation."""

    def reset(self, row) -> str:
        return row["prompt"]

    def step(self, action: str) -> Step:
        return Step(" ok then.")


def _run_episodes(work: Workload, config: Config, seed: int) -> dict[str, float]:
    """Multi-turn episodes (`run_episodes`, what `ppo` runs with an environment) and, on the same prompts, one turn
    of the episodes' mean length: tokens/s of each (sampled and observation tokens alike) and their ratio."""
    model = work.causal_lm(config, disable_dropout=True).to(_device())
    prompts = [work.rows[i % len(work.rows)].prompt_ids for i in range(EPISODE_ROWS)]
    rows = [{"prompt": work.tokenizer.decode(ids)} for ids in prompts]
    stops = tuple(range(2, 2 + VOCAB // 10))
    params = SamplingParams(EPISODE_TURN_TOKENS, temperature=1.0, top_k=0, top_p=1.0)
    budgets = Budgets(EPISODE_TURNS, EPISODE_TURN_TOKENS, EPISODE_TOTAL)
    start = time.perf_counter()
    episodes = run_episodes(
        model,
        work.tokenizer,
        _Echo,
        rows,
        budgets,
        params,
        seed=seed,
        batch_size=EPISODE_ROWS,
        tool_stops=stops,
        timeout_s=5.0,
        kind="bench",
    )
    wall = time.perf_counter() - start
    tokens = float(sum(len(e.ids) for e in episodes))
    single = SamplingParams(round(tokens / len(episodes)), temperature=1.0, top_k=0, top_p=1.0)
    start = time.perf_counter()
    samples = sample_ids(model, work.tokenizer, prompts, single, batch_size=EPISODE_ROWS, seed=seed)
    single_wall = time.perf_counter() - start
    single_tokens = sampled_tokens(samples)
    n = count_parameters(model)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "flops": 2 * n * tokens,
        "turns": sum(e.turns for e in episodes) / len(episodes),
        "single_turn_tokens_per_s": single_tokens / single_wall,
        "multi_vs_single": (tokens / wall) / (single_tokens / single_wall),
    }


def summarize(runs: list[dict[str, float]], peak_gflops: float) -> dict[str, float]:
    """Median of the runs (after the warm-up), with MFU against `peak_gflops`."""
    median = {key: float(torch.tensor([r[key] for r in runs]).median()) for key in runs[0]}
    median["mfu"] = median["flops"] / median["wall_s"] / (peak_gflops * 1e9)
    return median
