"""`trainer.strategy: fsdp` (FSDP2, `pipeline.train.sharding`) on two CPU processes with gloo matches one process
with the same effective batch: sft and dpo, with LoRA, through the chunked log-prob path (a 32,768-token vocabulary).

Each run is `python -m tests.sharded_fit` in its own process (Lightning's launcher re-runs the script per rank).
Tolerance: every step's loss within 1e-5 relative, every final weight within 1e-5 absolute (measured on this
machine: losses within 3e-7 relative, weights within 7e-8 for sft and 4e-7 for dpo); what differs is only the order
of floating-point reductions across the two ranks.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.project import ROOT

pytestmark = pytest.mark.slow  # launches processes


def _fit(out, *args: str) -> tuple[dict, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.sharded_fit", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((out / "run.json").read_text()), load_file(out / "weights.safetensors")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path, method):
    one, one_weights = _fit(tmp_path / "one", "--method", method, "--lora")
    two, two_weights = _fit(tmp_path / "fsdp", "--method", method, "--lora", "--strategy", "fsdp", "--devices", "2")
    assert two["sharded"] and not one["sharded"]  # it did train sharded, and was gathered for rank 0 to save
    assert len(two["losses"]) == len(one["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # it trained
    assert set(two_weights) == set(one_weights) and any("lora_" in name for name in one_weights)
    worst = max(float((two_weights[k] - one_weights[k]).abs().max()) for k in one_weights)
    assert worst < 1e-5, worst
    assert two["metrics"]["val/loss"] == pytest.approx(one["metrics"]["val/loss"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_rank_killed_mid_checkpoint_leaves_only_the_complete_one_before(tmp_path, strategy):
    """Rank 1 dies while the ranks gather the step-4 checkpoint (its callback state): rank 0 fails on the lost
    connection instead of writing or renaming it, and the step-2 checkpoint is the one a resume takes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    folder = tmp_path / "checkpoints"
    command = [
        sys.executable,
        "-m",
        "tests.sharded_fit",
        "--out",
        str(tmp_path / "out"),
        "--method",
        "sft",
        "--strategy",
        strategy,
        "--devices",
        "2",
        "--checkpoints",
        str(folder),
        "--die-at",
        "1:4",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000000002.ckpt", "step-000000002.json"]
    assert not (tmp_path / "out").exists()
    from stages.checkpoints import Checkpoints

    latest = Checkpoints(folder, every_n=2, keep=True).latest()
    assert latest == folder / "step-000000002.ckpt"
    assert len(torch.load(latest, weights_only=True)["callbacks"]["ResumeCallback"]["rng"]) == 2  # each rank's
