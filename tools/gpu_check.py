"""GPU check (not a DVC stage): `make gpu-check` on a CUDA machine writes reports/gpu-check.json.

It runs the `gpu` preset's whole DAG at reduced step counts (`pipeline.bench.gpu.GPU_CHECK_OVERRIDES`) in bf16-mixed,
in a scratch copy of the project (this checkout's outputs and MLflow store are left alone), one stage process after
another in `dvc.yaml`'s order, and records per stage the steady tokens/s, the MFU against this GPU's measured bf16
matmul peak (training stages), the peak GPU memory and the wall time; then the trained SFT model's sampling, eager
against compiled (`generation.compile`), on the same prompts and seed. It installs and downloads nothing: run it
with a Python that already has a CUDA build of torch and this project's dependencies (`GPU_PYTHON=...`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pipeline.bench.gpu import GPU_CHECK_OVERRIDES, bf16_matmul_peak_tflops, stage_figures
from pipeline.files import write_json

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_PROMPTS, SAMPLING_BATCH, SAMPLING_NEW_TOKENS = 1024, 256, 48


def _scratch_project(workdir: Path) -> None:
    for name in ("pipeline", "stages", "presets"):
        shutil.copytree(ROOT / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, workdir / name)
    subprocess.run([sys.executable, "-m", "tools.preset", "gpu"], cwd=workdir, check=True)
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in GPU_CHECK_OVERRIDES.items():
        params[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _sampling(workdir: Path) -> dict[str, float]:
    """Eager vs compiled decoding of the trained SFT model: tokens/s of each (the compiled one after a warm-up call
    that compiles it), and the share of completions that came out identical."""
    import pandas as pd
    from transformers import AutoModelForCausalLM

    from pipeline.bench.workloads import sampled_tokens
    from pipeline.data.tokenization import encode, load_tokenizer
    from pipeline.models.generation import SamplingParams, sample_ids

    tokenizer = load_tokenizer(str(workdir / "models/sft"))
    model = AutoModelForCausalLM.from_pretrained(workdir / "models/sft", dtype=torch.bfloat16).to("cuda").eval()
    prompts = pd.read_parquet(workdir / "data/prepared/val.parquet")["prompt"].tolist()
    ids = encode(tokenizer, [prompts[i % len(prompts)] for i in range(SAMPLING_PROMPTS)])
    out: dict[str, float] = {}
    completions = {}
    for mode in ("eager", "compiled"):
        params = SamplingParams(SAMPLING_NEW_TOKENS, 1.0, 0, 1.0, compiled=mode == "compiled")
        sample_ids(model, tokenizer, ids[:SAMPLING_BATCH], params, batch_size=SAMPLING_BATCH, seed=0)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        samples = sample_ids(model, tokenizer, ids, params, batch_size=SAMPLING_BATCH, seed=0)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        tokens = sampled_tokens(samples)
        out[f"{mode}_tokens_per_s"] = tokens / wall
        completions[mode] = samples.completion_ids
    out["speedup"] = out["compiled_tokens_per_s"] / out["eager_tokens_per_s"]
    same = sum(a == b for a, b in zip(completions["eager"], completions["compiled"], strict=True))
    out["identical_completions"] = same / len(ids)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/gpu-check.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project (its path is printed)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            f"gpu-check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
            "run it on a GPU machine, with a Python that has a CUDA build of torch: "
            "make gpu-check GPU_PYTHON=..."
        )
    peak = bf16_matmul_peak_tflops()
    print(f"gpu-check: {torch.cuda.get_device_name()}, bf16 matmul peak {peak:.0f} TFLOP/s")
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        _scratch_project(workdir)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            "ALIGN_RUN_GROUP": "gpu-check",
        }
        stages = {}
        for stage in yaml.safe_load((workdir / "dvc.yaml").read_text())["stages"]:  # written in dependency order
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=workdir, env=env, check=True)
            report = json.loads((workdir / "reports" / f"{stage}.json").read_text())
            stages[stage] = stage_figures(stage, report, time.perf_counter() - start, peak)
            print(f"gpu-check: {stage} {stages[stage]}")
        result = {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "bf16_matmul_peak_tflops": peak,
            "overrides": GPU_CHECK_OVERRIDES,
            "stages": stages,
            "sampling": _sampling(workdir),
        }
        write_json(result, args.out)
        print(f"gpu-check: {args.out}")
    finally:
        if args.keep:
            print(f"gpu-check: scratch project kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
