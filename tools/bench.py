"""Benchmark command (not a DVC stage): `make bench` prints and writes reports/bench.json.

Measures the fp32 matmul peak, then runs each training stage's real code path, and generation, on each fixed
workload of `pipeline.bench.workloads` (`scratch`, `hub`) in its own process (so peak memory is per stage): one
warm-up run, then the median of 3; then one DPO step's peak memory at a real vocabulary (`pipeline.bench.memory`),
before and after the memory work. Every config is this checkout's `params.yaml` with the bench's overrides laid
over it (`pipeline.bench.workloads.OVERRIDES`): they pin what shapes the workloads, so figures compare across
commits as long as the keys they leave to `params.yaml` (learning rates aside) are the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.bench.memory import dpo_memory_step
from pipeline.bench.workloads import (
    GENERATION_BATCHES,
    OPT_IN_STAGES,
    STAGES,
    WORKLOADS,
    bench_config,
    matmul_peak_gflops,
    run_stage,
    summarize,
    workload,
)
from pipeline.config import read_params
from pipeline.files import write_json

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _child(stage: str, kind: str, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as directory:
        work = workload(kind, directory, read_params(PARAMS))
        run_stage(stage, work)  # warm-up
        print(json.dumps([run_stage(stage, work, seed=i) for i in range(runs)]))


def _memory_case() -> dict[str, dict[str, float]]:
    """One DPO step at a 151,936-token vocabulary, before and after the memory work, each in a fresh process."""
    result = {}
    for variant in ("before", "after"):
        done = subprocess.run(
            [sys.executable, "-m", "tools.bench", "--memory-child", variant], capture_output=True, text=True
        )
        if done.returncode:
            sys.exit(f"bench: DPO memory case ({variant}) failed:\n{done.stderr[-3000:]}")
        result[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["before"]["peak_mb"] / result["after"]["peak_mb"]
    result["reduction"] = {"factor": ratio}
    print(
        f"DPO step at vocab 151,936, 4 pairs x 512 tokens: peak {result['before']['peak_mb']:.0f} MB before, "
        f"{result['after']['peak_mb']:.0f} MB after ({ratio:.1f}x lower); step "
        f"{result['before']['wall_s']:.1f} s vs {result['after']['wall_s']:.1f} s"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + OPT_IN_STAGES)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--child", choices=STAGES + OPT_IN_STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, default="scratch", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the DPO peak-memory case")
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.workload, args.runs)
    if args.memory_child:
        dpo = bench_config(read_params(PARAMS), {}, steps=1, packing=False, rollouts=1).dpo
        return print(json.dumps(dpo_memory_step(lean=args.memory_child == "after", cfg=dpo)))
    peak = matmul_peak_gflops()
    report = {
        "machine": {
            "fp32_matmul_peak_gflops": peak,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
    }
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print(
        f"{'workload':9} {'stage':21} {'wall s':>7} {'tokens/s':>9} {'MFU':>6} {'padding eff':>11} "
        f"{'peak RSS MB':>11}  more"
    )
    for kind in args.workloads:
        report[kind] = {}
        for stage in args.stages:
            done = subprocess.run(
                [sys.executable, "-m", "tools.bench", "--child", stage, "--workload", kind, "--runs", str(args.runs)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                sys.exit(f"bench: {kind} {stage} failed:\n{done.stderr[-3000:]}")
            result = summarize(json.loads(done.stdout.strip().splitlines()[-1]), peak)
            report[kind][stage] = result
            print(
                f"{kind:9} {stage:21} {result['wall_s']:7.2f} {result['tokens_per_s']:9.0f} {result['mfu']:6.1%} "
                f"{result.get('padding_efficiency', float('nan')):11.1%} {result['peak_rss_mb']:11.0f}  "
                f"{_more(result)}"
            )
    if not args.no_memory:
        report["dpo_memory"] = _memory_case()
    write_json(report, args.out)
    print(f"bench: wrote {args.out}")


def _more(result: dict[str, float]) -> str:
    """The stage-specific figures: PPO rollouts/s, generation tokens/s per batch size."""
    if "rollouts_per_s" in result:
        return f"{result['rollouts_per_s']:.2f} rollouts/s"
    if "multi_vs_single" in result:
        return (
            f"{result['turns']:.1f} turns; one turn of the same length: {result['single_turn_tokens_per_s']:.0f} "
            f"tok/s ({result['multi_vs_single']:.2f}x)"
        )
    return ", ".join(
        f"batch {b}: {result[f'tokens_per_s_batch{b}']:.0f} tok/s"
        for b in GENERATION_BATCHES
        if f"tokens_per_s_batch{b}" in result
    )


if __name__ == "__main__":
    main()
