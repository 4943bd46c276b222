"""`trainer.strategy: ddp` with two CPU processes, through the real stage script under DVC."""

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.project import Project

pytestmark = pytest.mark.slow


def test_sft_stage_under_ddp_logs_one_run_and_writes_once(tmp_path, upstream):
    # Checkpoints every 3 of the 8 steps and at the end: Lightning's save is collective, so every rank must call it.
    ddp = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp",
        "log_every_n_steps": 2,
        "checkpoint_every_n_steps": 3,
        "keep_checkpoints": True,
    }
    project = Project.copy_of(upstream.path, tmp_path / "repo")  # prepare reproduced; the strategy reruns sft
    for key, value in ddp.items():
        project.set_param("trainer", key, value)
    out = project.dvc("repro", "sft")
    assert "Starting with 2 processes" in out and project.ran(out) == {"sft"} and "prepare" in project.skipped(out)
    (kept,) = (project.path / ".checkpoints/sft").glob("*/step-*.ckpt")  # the older ones replaced by the last
    assert kept.name == "step-000000008.ckpt" and '"final": true' in kept.with_suffix(".json").read_text()
    assert (project.path / "models/sft/model.safetensors").exists()
    assert {"val/loss", "perf/tokens"} <= set(project.report("sft"))
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    # Rank 1 re-runs the script but joins rank 0's run instead of creating its own.
    assert [r.info.run_name for r in runs if r.data.tags["align.role"] == "stage"] == ["sft"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_online_dpo_rounds_under_ddp_sample_on_every_rank_and_measure_on_rank_0(tmp_path, upstream):
    # Each rank samples and labels the whole round (same weights, same seed) and trains on its share of the pairs; rank
    # 0 measures each round (the others wait at a barrier) and writes. A hang or a second run would fail this.
    project = Project.copy_of(upstream.path, tmp_path / "repo")
    for key, value in {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "checkpoint_every_n_steps": 3}.items():
        project.set_param("trainer", key, value)
    for key, value in {"online_rounds": 2, "online_prompts": 8, "max_steps": 8, "val_every_n_steps": 4}.items():
        project.set_param("dpo", key, value)
    out = project.dvc("repro", "-s", "dpo")  # the upstream stages as they are (the strategy would rerun them)
    assert "Starting with 2 processes" in out and project.ran(out) == {"dpo"}
    report = project.report("dpo")
    assert report["online/steps_per_round"] == 4
    assert report["round1/pairs"] > 0 and report["round2/pairs"] > 0
    assert {"round1/win_rate", "round2/win_rate", "round1/kl", "round2/kl"} <= set(report)
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    (stage_run,) = [r for r in runs if r.data.tags["align.role"] == "stage"]
    assert stage_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(stage_run.info.run_id, "round/pairs")] == [0, 4]
