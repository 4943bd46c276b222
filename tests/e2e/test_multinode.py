"""One training stage across two "nodes" of one process each, launched by `torchrun` with its c10d rendezvous on
127.0.0.1, under FSDP: the same outputs as two processes on one node; only rank 0 writes and logs; a rank that
dies fails the stage, named, with nothing written, and the nodes started again resume from its last checkpoint to
the uninterrupted run's weights.

Both "nodes" run in one project folder, as nodes of a cluster share a file system. Lightning reads the ranks and the
world size from torchrun's environment (its `TorchElasticEnvironment`); `trainer.num_nodes` x `trainer.devices`
must equal torchrun's world size.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.e2e.project import Project, free_port, runs_module
from tests.e2e.test_resume import _comparable

pytestmark = pytest.mark.slow
FSDP_TRAINER = {"strategy": "fsdp", "checkpoint_every_n_steps": 0}
OUTPUTS = ("models/sft", "reports/sft.json", "reports/plots/sft_loss.csv")


def _project(upstream: Project, path: Path, **trainer) -> Project:
    project = Project.copy_of(upstream.path, path)
    for key, value in {**FSDP_TRAINER, **trainer}.items():
        project.set_param("trainer", key, value)
    for output in OUTPUTS:  # upstream's sft outputs: this stage must write its own
        shutil.rmtree(path / output) if (path / output).is_dir() else (path / output).unlink()
    return project


def _torchrun_nodes(project: Project, nodes: int = 2) -> list[subprocess.Popen]:
    """`torchrun` once per node, as a cluster scheduler would start it on each, meeting at one rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--rdzv-id=sft",
        "--max-restarts=0",
        "-m",
        "stages.sft",
    ]
    logs = [open(project.path.parent / f"{project.path.name}-node{n}.log", "w") for n in range(nodes)]  # noqa: SIM115
    return [
        subprocess.Popen(
            command, cwd=project.path, env=project.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        for log in logs
    ]


def _node_logs(project: Project, tail: int | None = 6000) -> str:
    """Each node's launcher log, its last `tail` characters (all of it with None)."""
    logs = sorted(project.path.parent.glob(f"{project.path.name}-node*.log"))
    return "\n".join(f"== {path.name}\n{path.read_text()[-tail if tail else 0 :]}" for path in logs)


def _wait(nodes: list[subprocess.Popen], project: Project, timeout: float = 600) -> list[int]:
    try:
        return [node.wait(timeout=timeout) for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        raise AssertionError(f"torchrun still running after {timeout:.0f} s:\n{_node_logs(project)}") from None


def _stage_runs(project: Project) -> list:
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    return [r for r in runs if r.data.tags["align.role"] == "stage"]


def test_two_torchrun_nodes_train_as_two_processes_on_one_node_do(tmp_path, upstream):
    one_node = _project(upstream, tmp_path / "one-node", devices=2, num_nodes=1)
    one_node.run(sys.executable, "-m", "stages.sft")  # Lightning's own launcher starts rank 1
    two_nodes = _project(upstream, tmp_path / "two-nodes", devices=1, num_nodes=2)
    codes = _wait(_torchrun_nodes(two_nodes), two_nodes)
    assert codes == [0, 0], _node_logs(two_nodes)

    one = load_file(one_node.path / "models/sft/model.safetensors")
    two = load_file(two_nodes.path / "models/sft/model.safetensors")
    assert set(one) == set(two)
    worst = max(float((one[name] - two[name]).abs().max()) for name in one)
    assert worst < 1e-6, worst
    assert two_nodes.report("sft")["val/loss"] == pytest.approx(one_node.report("sft")["val/loss"], rel=1e-5)
    # Rank 0 alone logged: one sft run (beside the copied upstream's prepare), FINISHED, with its curve.
    (sft,) = [r for r in _stage_runs(two_nodes) if r.info.run_name == "sft"]
    assert sft.info.status == "FINISHED" and "val/loss" in sft.data.metrics


def test_a_node_that_dies_fails_the_stage_named_and_the_restarted_nodes_resume_to_the_uninterrupted_run(
    tmp_path, upstream
):
    steps = {"max_steps": 60, "val_every_n_steps": 30}
    uninterrupted = _project(upstream, tmp_path / "uninterrupted", devices=1, num_nodes=2)
    project = _project(upstream, tmp_path / "repo", devices=1, num_nodes=2, checkpoint_every_n_steps=4)
    for key, value in steps.items():
        uninterrupted.set_param("sft", key, value)
        project.set_param("sft", key, value)
    assert _wait(_torchrun_nodes(uninterrupted), uninterrupted) == [0, 0], _node_logs(uninterrupted)

    nodes = _torchrun_nodes(project)
    deadline = time.monotonic() + 300
    while not list(project.path.glob(".checkpoints/sft/*/step-*.ckpt")) and time.monotonic() < deadline:
        assert all(node.poll() is None for node in nodes), _node_logs(project)
        time.sleep(0.02)
    _worker_of_rank(project, 1).send_signal(signal.SIGKILL)
    codes = _wait(nodes, project, timeout=180)
    logs, shown = _node_logs(project, tail=None), _node_logs(project)  # searched whole: the launchers' shutdown
    assert all(code != 0 for code in codes), shown  # tracebacks can push rank 0's own error out of a tail
    # The dead rank's launcher names it and its signal; rank 0 fails on the lost connection instead of hanging.
    assert re.search(r"rank\s*:\s*1 \(local_rank: 0\)\s*exitcode\s*:\s*-9", logs), shown
    assert "Connection reset by peer" in logs or "Connection closed by peer" in logs, shown
    assert not any((project.path / output).exists() for output in OUTPUTS)
    (sft,) = [r for r in _stage_runs(project) if r.info.run_name == "sft"]
    assert sft.info.status == "FAILED"

    # The scheduler starts both nodes again: they resume from the checkpoint, into the same MLflow run.
    assert _wait(_torchrun_nodes(project), project) == [0, 0], _node_logs(project)
    assert re.search(r"resuming sft from step \d+", _node_logs(project, tail=None)), _node_logs(project)
    (resumed,) = [r for r in _stage_runs(project) if r.info.run_name == "sft"]
    assert resumed.info.run_id == sft.info.run_id and resumed.info.status == "FINISHED"
    weights = "models/sft/model.safetensors"
    assert (project.path / weights).read_bytes() == (uninterrupted.path / weights).read_bytes()
    assert _comparable(project.report("sft")) == _comparable(uninterrupted.report("sft"))


def _worker_of_rank(project: Project, rank: int):
    """The training process torchrun gave `rank` in `project` (found by its environment and folder)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if not runs_module(cmdline, "stages.sft") or runs_module(cmdline, "torch.distributed.run"):
            continue
        try:
            environ, cwd = process.environ(), process.cwd()
        except psutil.Error:
            continue
        if cwd != str(project.path):
            continue
        if environ.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in environ:
            return process
    raise AssertionError(f"no torchrun worker with RANK={rank}")
