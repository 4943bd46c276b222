"""SIGKILL a training stage mid-way, rerun `dvc repro`: it resumes from its checkpoint and ends where an
uninterrupted run ends (same weights, same metrics), continuing its MLflow run; no run is left RUNNING."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.project import Project

pytestmark = pytest.mark.slow


def _comparable(report: dict) -> dict:
    """Everything but wall-clock figures."""
    return {k: v for k, v in report.items() if not k.startswith(("perf/", "time/", "final/perf/", "final/time/"))}


def _kill_mid_stage(project: Project, stage: str) -> int:
    """Run `stage` and SIGKILL the whole `dvc repro` process group once its first checkpoint is written."""
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-s", stage], cwd=project.path,
                               env=project.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    folder = project.path / ".checkpoints" / stage
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        written = list(folder.glob("*/step-*.ckpt"))
        if written:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return int(written[0].stem.split("-")[1])
        time.sleep(0.02)
    raise AssertionError(f"{stage} finished or hung before writing a checkpoint (exit {process.poll()})")


def _runs(project: Project, stage: str):
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("alignment").experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`align.stage` = '{stage}'")


@pytest.mark.parametrize(
    ("stage", "upstream", "overrides"),
    [
        ("sft", "prepare", {"sft": {"max_steps": 60, "val_every_n_steps": 20},
                            "trainer": {"checkpoint_every_n_steps": 10}}),
        ("reward", "preferences", {"reward": {"max_steps": 40, "val_every_n_steps": 20},
                                   "trainer": {"checkpoint_every_n_steps": 10}}),
        ("dpo", "reference", {"dpo": {"max_steps": 40, "val_every_n_steps": 20},
                              "trainer": {"checkpoint_every_n_steps": 10}}),
        ("ppo", "reward", {"ppo": {"rollouts": 10}, "trainer": {"checkpoint_every_n_steps": 2}}),
    ],
)  # fmt: skip
def test_killed_stage_resumes_and_matches_an_uninterrupted_run(tmp_path, stage, upstream, overrides):
    project = Project(tmp_path / "repo", overrides=overrides)
    project.dvc("repro", upstream)
    killed_at = _kill_mid_stage(project, stage)
    total = overrides[stage].get("max_steps") or overrides[stage]["rollouts"]
    assert 0 < killed_at < total
    zombie = [r for r in _runs(project, stage) if r.info.status == "RUNNING"]
    assert len(zombie) == 1  # the killed process could not close its run

    out = project.dvc("repro", stage)
    assert f"resuming {stage} from step {killed_at}" in out
    resumed_report = _comparable(project.report(stage))
    resumed_weights = (project.path / f"models/{stage}/model.safetensors").read_bytes()
    assert not list((project.path / ".checkpoints").glob(f"{stage}/*/step-*.ckpt"))  # removed once outputs exist
    runs = _runs(project, stage)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    resumed = next(r for r in runs if r.info.run_id == zombie[0].info.run_id)  # the same run, continued
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("align.resumed") == "true"

    project.dvc("repro", "-f", "-s", "--no-run-cache", stage)  # the same stage, never interrupted
    assert _comparable(project.report(stage)) == resumed_report
    assert (project.path / f"models/{stage}/model.safetensors").read_bytes() == resumed_weights
