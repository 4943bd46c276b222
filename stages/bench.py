"""Benchmark command (not a DVC stage): `make bench` prints and writes reports/bench.json.

Measures the fp32 matmul peak, then runs each training stage's real code path on the fixed workload of
`pipeline.bench` in its own process (so peak memory is per stage): one warm-up run, then the median of 3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from pipeline.bench import dpo_memory_step, matmul_peak_gflops, run_stage, summarize, workload
from pipeline.io import write_json

STAGES = ("sft", "reward", "dpo", "ppo")


def _child(stage: str, runs: int) -> None:
    tokenizer, rows, pairs = workload()
    run_stage(stage, tokenizer, rows, pairs)  # warm-up
    print(json.dumps([run_stage(stage, tokenizer, rows, pairs, seed=i) for i in range(runs)]))


def _memory_case() -> dict[str, dict[str, float]]:
    """One DPO step at a 151,936-token vocabulary, before and after the memory work, each in a fresh process."""
    result = {}
    for variant in ("before", "after"):
        done = subprocess.run([sys.executable, "-m", "stages.bench", "--memory-child", variant], capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode:
            sys.exit(f"bench: DPO memory case ({variant}) failed:\n{done.stderr[-3000:]}")
        result[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["before"]["peak_mb"] / result["after"]["peak_mb"]
    result["reduction"] = {"factor": ratio}
    print(f"DPO step at vocab 151,936, 4 pairs x 512 tokens: peak {result['before']['peak_mb']:.0f} MB before, "
          f"{result['after']['peak_mb']:.0f} MB after ({ratio:.1f}x lower); step "
          f"{result['before']['wall_s']:.1f} s vs {result['after']['wall_s']:.1f} s")  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="reports/bench.json")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the DPO peak-memory case")
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.runs)
    if args.memory_child:
        return print(json.dumps(dpo_memory_step(lean=args.memory_child == "after")))
    peak = matmul_peak_gflops()
    report = {"machine": {"fp32_matmul_peak_gflops": peak, "threads": torch.get_num_threads(),
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}}  # fmt: skip
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"{'stage':8} {'wall s':>8} {'tokens/s':>10} {'MFU':>6} {'peak RSS MB':>12}")
    for stage in args.stages:
        done = subprocess.run([sys.executable, "-m", "stages.bench", "--child", stage, "--runs", str(args.runs)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            sys.exit(f"bench: {stage} failed:\n{done.stderr[-3000:]}")
        result = summarize(json.loads(done.stdout.strip().splitlines()[-1]), peak)
        report[stage] = result
        print(f"{stage:8} {result['wall_s']:8.2f} {result['tokens_per_s']:10.0f} {result['mfu']:6.1%} "
              f"{result['peak_rss_mb']:12.0f}")  # fmt: skip
    if not args.no_memory:
        report["dpo_memory"] = _memory_case()
    write_json(report, args.out)
    print(f"bench: wrote {args.out}")


if __name__ == "__main__":
    main()
