"""A real `mlflow server` (started by `make ui`) receives the `gpu` preset's whole DAG at bf16-mixed, on CPU at tiny
size (dtype bugs surface here before a GPU run); checked through its REST API. One DAG serves both checks."""

import json
import math
import subprocess
import urllib.request

import pytest

from pipeline.track.tracking import training_runs_url
from tests.e2e.project import ROOT, Project, free_port
from tests.e2e.test_pipeline import STAGES

pytestmark = pytest.mark.slow


def _api(port: int, path: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_gpu_preset_whole_dag_at_bf16_mixed_logs_through_a_local_mlflow_server(tmp_path):
    project = Project(tmp_path / "repo", preset="gpu")  # the tiny sizes replace the preset's model and batches
    store, port = tmp_path / "server", free_port()
    store.mkdir()
    make = ["make", "-C", str(ROOT), f"MLFLOW_PORT={port}", f"MLFLOW_STORE={store}"]
    started = subprocess.run([*make, "ui"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        assert f"http://127.0.0.1:{port}" in started.stdout
        project.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
        assert project.ran(project.dvc("repro")) == STAGES
        _finite_at_bf16_mixed(project)
        experiment = _api(port, "experiments/get-by-name?experiment_name=alignment")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        # `make ui` names the page users want: the training-runs table, not MLflow 3's GenAI overview.
        url = training_runs_url(f"http://127.0.0.1:{port}", "alignment")
        assert url == f"http://127.0.0.1:{port}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
        runs = _api(port, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
        parents = [run for run, t in zip(runs, tags, strict=True) if t["align.role"] == "group"]
        children = {t["align.stage"]: run for run, t in zip(runs, tags, strict=True) if t["align.role"] == "stage"}
        assert len(parents) == 1 and set(children) == STAGES
        parent_id = parents[0]["info"]["run_id"]
        assert all(
            {t["key"]: t["value"] for t in run["data"]["tags"]}["mlflow.parentRunId"] == parent_id
            for run in children.values()
        )
        sft = children["sft"]
        metrics = {m["key"] for m in sft["data"]["metrics"]}
        assert {"train/loss", "val/loss", "val/perplexity", "perf/tokens_per_s"} <= metrics
        history = _api(port, f"metrics/get-history?run_id={sft['info']['run_id']}&metric_key=train/loss")["metrics"]
        assert len(history) >= 4
        listed = _api(port, f"artifacts/list?run_id={sft['info']['run_id']}")
        assert {"sft.json", "samples"} <= {f["path"].split("/")[0] for f in listed.get("files", [])}
    finally:
        stopped = subprocess.run([*make, "ui-stop"], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout


def _finite_at_bf16_mixed(project: Project) -> None:
    assert project.lock()["sft"]["params"]["params.yaml"]["trainer.precision"] == "bf16-mixed"  # tracked per key
    for stage in ("sft", "reward", "dpo"):
        assert math.isfinite(project.report(stage)["train/loss"]), stage
    metrics = project.report("metrics")
    assert all(math.isfinite(value) for key, value in metrics.items() if not key.endswith("ci95")), metrics
    assert metrics["sft/kl"] == 0.0 and metrics["dpo/kl"] > 0.0
