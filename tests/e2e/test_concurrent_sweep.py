"""Two queued sweep points run at once (`dvc queue start -j 2`) on the default SQLite store: both land in MLflow."""

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.project import Project

pytestmark = pytest.mark.slow


def test_two_queue_workers_both_land_every_stage_run(tmp_path):
    project = Project(tmp_path / "repo")
    project.dvc("repro", "reference")  # the shared upstream, so the two points differ only from dpo on
    project.commit("baseline")
    for beta in ("0.2", "0.4"):
        project.dvc("exp", "run", "--queue", "-S", f"dpo.beta={beta}", "-n", f"beta{beta}")
    status = project.run_queue(jobs=2)
    assert status.count("Success") == 2, status
    shown = json.loads(project.dvc("exp", "show", "--json"))
    names = {rev["name"] for entry in shown for e in entry.get("experiments") or [] for rev in e["revs"]}
    assert {"beta0.2", "beta0.4"} <= names
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    for group in ("beta0.2", "beta0.4"):
        stages = {r.data.tags.get("align.stage") for r in runs if r.data.tags.get("align.run_group") == group}
        assert {"dpo", "ppo", "evaluate"} <= stages, (group, stages)
        assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("align.run_group") == group)
