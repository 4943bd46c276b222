"""`make gpu-check`'s pieces the tool (`tools/gpu_check.py`) applies and reads: the overrides laid over the `gpu`
preset, the GPU's measured bf16 matmul peak, and one stage's figures from its report."""

from __future__ import annotations

import time

import torch

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
