"""Two queued sweep points run at once (`dvc queue start -j 2`) on the default SQLite store: both land in MLflow.

DVC's queue has an open race of its own with more than one worker (treeverse/dvc#10673: a task can fail in DVC's
setup or collection, before or after any stage runs, with no stage log). Such a round is run again, up to
`ATTEMPTS` times, and if DVC fails every one the test is reported as an expected failure with DVC's logs. A stage of
ours that fails (a FAILED MLflow run, or a stage command that exited non-zero in the task's log) fails the test at
once. The store side is also tested without DVC in tests/integration/test_concurrent_tracking.py."""

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.project import Project

pytestmark = pytest.mark.slow
ATTEMPTS = 3


def test_two_queue_workers_both_land_every_stage_run(tmp_path, upstream):
    project = Project.copy_of(upstream.path, tmp_path / "repo")  # the shared upstream: the points differ from dpo on
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    dvc_failures = []
    for attempt in range(1, ATTEMPTS + 1):
        points = {f"beta{beta}-try{attempt}": beta for beta in ("0.2", "0.4")}
        for group, beta in points.items():
            project.dvc("exp", "run", "--queue", "-S", f"dpo.beta={beta}", "-n", group)
        groups = list(points)
        status = "\n".join(line for line in project.run_queue(jobs=2).splitlines() if set(line.split()) & set(groups))
        runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
        logs = project.failed_task_logs(status)
        failed_stages = [r for r in runs if r.data.tags.get("align.run_group") in groups and r.info.status == "FAILED"]
        assert not failed_stages and "failed to run:" not in logs, f"a stage failed:\n{status}\n{logs}"
        if status.count("Success") == 2:
            break
        dvc_failures.append(f"attempt {attempt}:\n{status}\n{logs}\n{project.worker_logs()}")
    else:
        pytest.xfail("treeverse/dvc#10673: DVC's queue failed a task in every round, no stage of ours failing:\n"
                     + "\n".join(dvc_failures))  # fmt: skip

    shown = json.loads(project.dvc("exp", "show", "--json"))
    names = {rev["name"] for entry in shown for e in entry.get("experiments") or [] for rev in e["revs"]}
    assert set(groups) <= names
    runs = {r.info.run_id: r for r in runs}
    for group in groups:
        mine = [r for r in runs.values() if r.data.tags.get("align.run_group") == group]
        assert {"dpo", "ppo", "evaluate"} <= {r.data.tags.get("align.stage") for r in mine}, group
        assert all(r.info.status == "FINISHED" for r in mine)
    # they did run at once: the two points' stage runs overlap in time
    spans = []
    for group in groups:
        infos = [r.info for r in runs.values() if r.data.tags.get("align.run_group") == group]
        spans.append((min(i.start_time for i in infos), max(i.end_time for i in infos)))
    (start_one, end_one), (start_two, end_two) = spans
    assert start_one < end_two and start_two < end_one, spans
