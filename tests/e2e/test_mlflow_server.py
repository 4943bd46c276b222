"""A real `mlflow server` (started by `make ui`) receives the `gpu` preset's whole DAG at bf16-mixed, on CPU at tiny
size (dtype bugs surface here before a GPU run); checked through its REST API. One DAG serves both checks."""

import json
import math
import re
import subprocess
import sys
import time
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
        assert (
            url == f"http://127.0.0.1:{port}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
        )
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


def test_a_server_lost_mid_stage_fails_it_in_one_line_and_the_rerun_resumes_into_the_same_run(tmp_path, upstream):
    """The tracking server stops while `sft` trains (after its first checkpoint): the stage fails with one line
    naming MLFLOW_TRACKING_URI and the checkpoint a rerun resumes from, no traceback; once the server is back, the
    rerun resumes from that checkpoint into the same MLflow run and finishes it."""
    project = Project.copy_of(upstream.path, tmp_path / "repo")
    for section, key, value in [("sft", "max_steps", 200), ("trainer", "checkpoint_every_n_steps", 4)]:
        project.set_param(section, key, value)
    store, port = tmp_path / "server", free_port()
    store.mkdir()
    make = ["make", "-C", str(ROOT), f"MLFLOW_PORT={port}", f"MLFLOW_STORE={store}"]
    uri = f"http://127.0.0.1:{port}"
    # The client's own retries (3, with backoff: ~15 s) are the user's default; none here, to fail at once.
    project.env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    assert subprocess.run([*make, "ui"], capture_output=True, text=True, timeout=300).returncode == 0
    try:
        stage = subprocess.Popen(
            [sys.executable, "-m", "stages.sft"],
            cwd=project.path,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not list(project.path.glob(".checkpoints/sft/*/step-*.ckpt")) and time.monotonic() < deadline:
            assert stage.poll() is None, stage.communicate()
            time.sleep(0.05)
    finally:
        subprocess.run([*make, "ui-stop"], capture_output=True, text=True, timeout=120)
    out, err = stage.communicate(timeout=300)
    assert stage.returncode == 1, out[-3000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"MLFLOW_TRACKING_URI={uri}: the tracking server stopped answering while the stage ran")
    step = int(re.search(r"resumes from its checkpoint at step (\d+)", last).group(1))
    assert "in the same MLflow run" in last and "Traceback" not in err
    weights = project.path / "models/sft/model.safetensors"  # upstream's: the failed stage wrote none
    assert weights.read_bytes() == (upstream.path / "models/sft/model.safetensors").read_bytes()

    assert subprocess.run([*make, "ui"], capture_output=True, text=True, timeout=300).returncode == 0
    try:
        rerun = project.run(sys.executable, "-m", "stages.sft")
        experiment = _api(port, "experiments/get-by-name?experiment_name=alignment")["experiment"]["experiment_id"]
        query = {"experiment_ids": [experiment], "filter": "tags.`align.stage` = 'sft'"}
        runs = _api(port, "runs/search", query)["runs"]
    finally:
        subprocess.run([*make, "ui-stop"], capture_output=True, text=True, timeout=120)
    assert f"resuming sft from step {step}" in rerun
    assert [run["info"]["status"] for run in runs] == ["FINISHED"]  # the one run, continued
