"""The `gpu` preset's whole DAG (bf16-mixed) on CPU at tiny size: dtype bugs surface here before a GPU run."""

import math

import pytest

from tests.e2e.project import Project
from tests.e2e.test_pipeline import STAGES

pytestmark = pytest.mark.slow


def test_gpu_preset_whole_dag_at_bf16_mixed_on_cpu(tmp_path):
    project = Project(tmp_path / "repo", preset="gpu")  # the tiny sizes replace the preset's model and batches
    assert project.ran(project.dvc("repro")) == STAGES
    assert project.lock()["sft"]["params"]["params.yaml"]["trainer.precision"] == "bf16-mixed"  # tracked per key
    for stage in ("sft", "reward", "dpo"):
        assert math.isfinite(project.report(stage)["train/loss"]), stage
    metrics = project.report("metrics")
    assert all(math.isfinite(value) for key, value in metrics.items() if not key.endswith("ci95")), metrics
    assert metrics["sft/kl"] == 0.0 and metrics["dpo/kl"] > 0.0
