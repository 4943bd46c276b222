"""SIGKILL a training stage mid-way, rerun `dvc repro`: it resumes from its checkpoint and ends where an
uninterrupted run ends (same weights, same metrics), continuing its MLflow run; no run is left RUNNING, also when DVC
restores the killed stage from its run-cache instead of running it."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import built_once
from tests.e2e.project import Project
from tools.warm import SOCKET_ENV

pytestmark = pytest.mark.slow


def _comparable(report: dict) -> dict:
    """Everything but wall-clock figures."""
    return {k: v for k, v in report.items() if not k.startswith(("perf/", "time/", "final/perf/", "final/time/"))}


def _kill_mid_stage(project: Project, stage: str, *flags: str, steps: range | None = None) -> int:
    """Run `stage` and SIGKILL the whole `dvc repro` process group once its first checkpoint is written (with `steps`:
    once its newest checkpoint is at one of them); the step killed at. The stage starts cold (no warm server,
    tests/conftest.py): the process killed is the stage itself, as for a user."""
    cold = {key: value for key, value in project.env.items() if key != SOCKET_ENV}
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *flags, "-s", stage],
        cwd=project.path,
        env=cold,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folder = project.path / ".checkpoints" / stage
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        written = [int(path.stem.split("-")[1]) for path in folder.glob("*/step-*.ckpt")]
        if written and (steps is None or max(written) in steps):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return max(written)
        time.sleep(0.01)
    wanted = f"a checkpoint at steps {steps}" if steps is not None else "writing a checkpoint"
    raise AssertionError(f"{stage} finished or hung before {wanted} (exit {process.poll()})")


def _runs(project: Project, stage: str | None):
    """The runs of `stage` (None: every run)."""
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("alignment").experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`align.stage` = '{stage}'" if stage else "")


def _marked_killed(project: Project, stage: str | None = None, timeout: float = 60) -> list:
    """The runs of `stage` (of every stage and pipeline run with None), once none is RUNNING: the killed process's
    watcher (stages/reaper.py) marks its runs KILLED within seconds of its death."""
    deadline = time.time() + timeout
    while (runs := _runs(project, stage)) and any(r.info.status == "RUNNING" for r in runs):
        assert time.time() < deadline, [(r.info.run_name, r.info.status) for r in runs]
        time.sleep(0.5)
    return runs


@pytest.mark.parametrize(
    ("stage", "before", "overrides"),
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
def test_killed_stage_resumes_and_matches_an_uninterrupted_run(tmp_path, upstream, stage, before, overrides):
    project = Project.copy_of(upstream.path, tmp_path / "repo")  # the stages before `stage` already reproduced
    for section, values in overrides.items():
        for key, value in values.items():
            project.set_param(section, key, value)
    assert before not in project.dvc("status", before)  # the stage before it is up to date: only `stage` runs
    killed_at = _kill_mid_stage(project, stage)
    total = overrides[stage].get("max_steps") or overrides[stage]["rollouts"]
    assert 0 < killed_at < total
    zombie = [r for r in _marked_killed(project, stage) if r.info.status == "KILLED"]
    assert len(zombie) == 1  # the killed process could not end its run: its watcher did

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


# A model of 32 positions that has not learned to stop (8 SFT steps), budgets the context must cut, checkpoints on.
SHORT_CONTEXT = {
    "model": {"n_positions": 32},
    "trainer": {"checkpoint_every_n_steps": 4},
    "sft": {"max_length": 32, "max_new_tokens": 28, "on_invalid": "drop"},
    "preferences": {"max_length": 32, "max_new_tokens": 12},  # pairs must fit 32 with their EOS to be trained on
    "reward": {"max_length": 32},
    "reference": {"max_length": 32},
    "dpo": {"max_length": 32, "max_new_tokens": 28},
    "ppo": {"max_new_tokens": 28},
    "evaluate": {"max_new_tokens": 28},
}


@pytest.fixture(scope="session")
def short_context(tmp_path_factory, worker_id):
    """The DAG on a 32-position model, whose sft stage first fails in a step after training (its loss curve's path
    is under a regular file) and is then rerun with the whole DAG by `dvc repro`. Built once per test run."""

    def build(path):
        project = Project(path / "repo", overrides=SHORT_CONTEXT)
        project.dvc("repro", "prepare")
        (project.path / "blocker").write_text("a file, not a folder")
        failed = project.run(sys.executable, "-m", "stages.sft", "--curve", "blocker/sft_loss.csv", check=False)
        (path / "failed.txt").write_text(failed)
        (path / "trained.safetensors").write_bytes((project.path / "models/sft/model.safetensors").read_bytes())
        (path / "rerun.txt").write_text(project.dvc("repro"))

    path = built_once(tmp_path_factory, worker_id, "short-context", build)
    failed, rerun = (path / "failed.txt").read_text(), (path / "rerun.txt").read_text()
    return Project.at(path / "repo"), failed, (path / "trained.safetensors").read_bytes(), rerun


def test_a_stage_that_fails_after_training_resumes_at_its_end_and_trains_no_step_again(short_context):
    project, failed, trained_weights, rerun = short_context
    assert "FileExistsError: [Errno 17] File exists: 'blocker'" in failed  # the curve's folder is a file
    assert "resuming sft at the end of training (step 8): no step is trained again" in rerun
    assert (project.path / "models/sft/model.safetensors").read_bytes() == trained_weights
    assert project.report("sft")["train/loss"] > 0 and "perf/tokens_per_s" in project.report("sft")
    runs = _runs(project, "sft")
    assert {r.info.status for r in runs} == {"FINISHED"}  # the failed run, continued and finished
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    history = [m for r in runs for m in client.get_metric_history(r.info.run_id, "perf/wall_s")]
    # Logged when training ended, then again by the rerun from the checkpoint's measurement: a second training
    # would have measured another wall time.
    assert len(history) == 2 and history[0].value == history[1].value
    assert not list((project.path / ".checkpoints").glob("sft/*/step-*.ckpt"))  # cleared once the outputs exist


def test_every_sampling_stage_stays_within_a_short_context_and_counts_the_rows_it_cut(short_context):
    project, _, _, rerun = short_context
    assert Project.ran(rerun) == {"sft", "preferences", "reward", "reference", "dpo", "ppo", "evaluate"}
    assert project.report("sft")["samples/stopped_by_context"] > 0
    assert project.report("dpo")["objective/stopped_by_context"] > 0
    assert project.report("ppo")["final/val/stopped_by_context"] > 0
    metrics = project.report("metrics")
    assert metrics["sft/stopped_by_context"] > 0 and metrics["bon/stopped_by_context"] > 0
    preferences = project.report("preferences")
    assert "train/samples/stopped_by_context" in preferences and preferences["train/pairs_written"] > 0


def test_a_killed_stage_that_dvc_restores_from_its_run_cache_leaves_no_run_running(tmp_path, upstream):
    project = Project.copy_of(upstream.path, tmp_path / "repo")
    project.set_param("trainer", "checkpoint_every_n_steps", 1)  # a runtime knob: no part of the run-cache's key
    project.dvc("repro", "dpo")  # its run-cache entry
    _kill_mid_stage(project, "dpo", "-f")  # the same stage again, killed mid-training
    out = project.dvc("repro", "dpo")
    assert "Stage 'dpo' is cached - skipping run, checking out outputs" in out  # no process of ours ran
    killed = [r for r in _marked_killed(project) if r.info.status == "KILLED"]
    roles = sorted((r.data.tags["align.role"], r.data.tags.get("align.stage")) for r in killed)
    assert roles == [("group", None), ("stage", "dpo")]  # the stage's run and its pipeline run


def test_online_dpo_killed_in_round_2_resumes_in_round_2_and_matches_an_uninterrupted_run(tmp_path, upstream):
    """Three online rounds of 8 steps, a checkpoint every 2: SIGKILL after one of round 2's checkpoints (steps 10,
    12, 14); the rerun resumes there, trains on the pairs the checkpoint holds, and ends as a run never killed."""
    project = Project.copy_of(upstream.path, tmp_path / "repo")
    online = {"online_rounds": 3, "online_prompts": 16, "max_steps": 24, "val_every_n_steps": 8}
    for key, value in online.items():
        project.set_param("dpo", key, value)
    project.set_param("trainer", "checkpoint_every_n_steps", 2)
    killed_at = _kill_mid_stage(project, "dpo", steps=range(10, 16))
    out = project.dvc("repro", "dpo")
    assert f"resuming dpo from step {killed_at}" in out
    resumed_report = _comparable(project.report("dpo"))
    resumed_weights = (project.path / "models/dpo/model.safetensors").read_bytes()
    assert resumed_report["online/steps_per_round"] == 8
    for index in (1, 2, 3):  # every round labelled and measured, the killed one too
        assert resumed_report[f"round{index}/pairs"] > 0
        assert 0 <= resumed_report[f"round{index}/win_rate"] <= 1
    run = next(r for r in _runs(project, "dpo") if r.data.tags.get("align.resumed") == "true")
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "round/pairs")
    assert sorted(m.step for m in history) == [0, 8, 16]  # each round's labelling logged once, at its start
    measured = client.get_metric_history(run.info.run_id, "round/win_rate")
    assert sorted(m.step for m in measured) == [8, 16, 24]  # and its measurement at its end, the last one's too

    project.dvc("repro", "-f", "-s", "--no-run-cache", "dpo")  # never interrupted
    assert _comparable(project.report("dpo")) == resumed_report
    assert (project.path / "models/dpo/model.safetensors").read_bytes() == resumed_weights
