"""The embedded default's whole DAG at bf16-mixed on CPU, tiny: dtype bugs surface here before a GPU run."""

import pytest

from tests.e2e.project import Project
from tests.e2e.test_pipeline import STAGES

pytestmark = pytest.mark.slow


def test_whole_dag_at_bf16_mixed_on_cpu(tmp_path):
    project = Project(tmp_path / "repo", overrides={"trainer": {"precision": "bf16-mixed"}})
    assert project.ran(project.dvc("repro")) == STAGES
    for stage in ("sft", "reward", "dpo"):
        assert project.report(stage)["train/loss"] == pytest.approx(project.report(stage)["train/loss"])  # finite
    metrics = project.report("metrics")
    assert all(value == value for value in metrics.values())  # no NaN anywhere
    assert metrics["sft/kl"] == 0.0 and metrics["dpo/kl"] > 0.0
