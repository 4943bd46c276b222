"""Several stage processes write to one SQLite store at the same time (what `dvc queue start -j N` does), starting
from no store at all: every run, param and metric step lands."""

import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.track.tracking import GROUP_TAG, STAGE_TAG

WRITERS, STEPS = 3, 60
WRITER = """
import sys, time
from pathlib import Path
from pipeline.track.tracking import StageRun, resolve_context

root, group = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{group}").touch()
while not (root / "go").exists():
    time.sleep(0.01)
ctx = resolve_context({"DVC_ROOT": str(root), "ALIGN_RUN_GROUP": group}, root, f"group: {group}\\n")
params = {f"dpo.p{i}": i for i in range(40)}
with StageRun(ctx, "dpo", params, params, tags={"writer": group}, system_metrics=True) as run:
    for step in range({steps}):
        run.log_metrics({{"loss": step / 10, "reward/margin": -step / 10}}, step=step)
"""


def test_concurrent_stage_processes_on_a_fresh_sqlite_store_all_land(tmp_path):
    script = WRITER.replace("{steps}", str(STEPS)).replace("{{", "{").replace("}}", "}")
    env = {
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "PATH": "/usr/bin:/bin",
    }
    groups = [f"g{i}" for i in range(WRITERS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), g],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for g in groups
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{g}").exists() for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()  # all start together, on a store none of them has created yet
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * WRITERS, "\n".join(outputs)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("alignment").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`{STAGE_TAG}` = 'dpo'")
    assert sorted(r.data.tags[GROUP_TAG] for r in runs) == groups
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(run.data.params) >= 40
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(STEPS))
