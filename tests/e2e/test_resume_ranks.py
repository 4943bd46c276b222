"""SIGKILL one process of a two-process training stage (gloo on the CPU) once it has written a mid-stage checkpoint,
rerun `dvc repro`: it resumes from that checkpoint and ends where an uninterrupted run of the same strategy ends,
every weight and every figure of its report the same.

Under Lightning's launcher rank 0 is the stage process DVC started and rank 1 its child; the other rank fails on the
lost connection (gloo) and nothing is written. The stage processes start cold (no warm server): the processes killed
are the stage's own, as for a user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.e2e.project import Project, runs_module
from tests.e2e.test_resume import _comparable, _runs
from tools.warm import SOCKET_ENV

pytestmark = pytest.mark.slow
TWO_PROCESSES = {"accelerator": "cpu", "devices": 2, "log_every_n_steps": 1}


def _stage_processes(dvc: psutil.Process, stage: str) -> list[psutil.Process]:
    """The stage's Python processes under `dvc` (never the shell DVC ran them through), rank 0 first (Lightning's
    launcher starts rank 1 as its child)."""
    found = []
    for process in dvc.children(recursive=True):
        try:
            if runs_module(process.cmdline(), f"stages.{stage}"):
                found.append(process)
        except psutil.Error:
            continue
    pids = {p.pid for p in found}
    return sorted(found, key=lambda p: p.ppid() in pids)


def _kill_rank_after_checkpoint(project: Project, stage: str, rank: int) -> int:
    """`dvc repro -s stage`, SIGKILL of rank `rank` alone once the first checkpoint is written; the step it holds.
    Every process of the run must end by itself afterwards: the surviving rank fails, it does not hang."""
    cold = {key: value for key, value in project.env.items() if key != SOCKET_ENV}
    log = project.path.parent / f"{project.path.name}-killed.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "-s", stage],
            cwd=project.path,
            env=cold,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    dvc, folder = psutil.Process(process.pid), project.path / ".checkpoints" / stage
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        written = list(folder.glob("*/step-*.ckpt"))
        ranks = _stage_processes(dvc, stage)
        if written and len(ranks) == 2:
            ranks[rank].send_signal(signal.SIGKILL)
            try:
                code = process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                hung = f"the other rank hung after rank {rank} was killed:\n{log.read_text()[-4000:]}"
                raise AssertionError(hung) from None
            assert code != 0, log.read_text()[-4000:]
            return int(written[0].stem.split("-")[1])
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"{stage} ended or hung before its first checkpoint:\n{log.read_text()[-4000:]}")


CASES = {
    # Dropout on: each rank draws its own masks, so each rank's random state must come back as it was.
    "sft-fsdp-rank0": ("sft", "fsdp", 0, {"sft": {"max_steps": 12, "val_every_n_steps": 6}, "model": {"dropout": 0.1}}),
    "dpo-ddp-rank0": ("dpo", "ddp", 0, {"dpo": {"max_steps": 12, "val_every_n_steps": 6}}),
    "dpo-fsdp-rank1": ("dpo", "fsdp", 1, {"dpo": {"max_steps": 12, "val_every_n_steps": 6}}),
    "ppo-ddp-rank0": ("ppo", "ddp", 0, {"ppo": {"rollouts": 6}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_rank_resumes_to_the_uninterrupted_run(tmp_path, upstream, case):
    stage, strategy, rank, overrides = CASES[case]
    project = Project.copy_of(upstream.path, tmp_path / "repo")
    for key, value in {
        **TWO_PROCESSES,
        "strategy": strategy,
        "checkpoint_every_n_steps": 4 if stage != "ppo" else 2,
    }.items():
        project.set_param("trainer", key, value)
    for section, values in overrides.items():
        for key, value in values.items():
            project.set_param(section, key, value)
    killed_at = _kill_rank_after_checkpoint(project, stage, rank)
    assert not (project.path / f"models/{stage}").exists()  # DVC removed the old outputs; nothing new written

    out = project.dvc("repro", "-s", stage)  # the upstream stages track the trainer keys too: left as they are
    assert f"resuming {stage} from step {killed_at}" in out, out
    resumed_report = _comparable(project.report(stage))
    resumed_weights = (project.path / f"models/{stage}/model.safetensors").read_bytes()
    assert not [r for r in _runs(project, stage) if r.info.status == "RUNNING"]

    project.dvc("repro", "-f", "-s", "--no-run-cache", stage)  # the same stage and strategy, never interrupted
    assert _comparable(project.report(stage)) == resumed_report
    assert (project.path / f"models/{stage}/model.safetensors").read_bytes() == resumed_weights
