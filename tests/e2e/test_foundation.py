"""prepare + sft through real DVC, real MLflow (SQLite) and a real Lightning Trainer: the shared upstream's first
`dvc repro` from nothing, then reruns in a copy of it."""

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.files import dvc_md5
from tests.e2e.conftest import run_root
from tests.e2e.project import Project

pytestmark = pytest.mark.slow
DETERMINISTIC = ("val/loss", "val/perplexity", "train/loss", "perf/tokens", "model/parameters")
REPRODUCED = {"prepare", "sft", "preferences", "reward", "reference"}  # the upstream's stages and theirs


def test_prepare_and_sft_under_dvc(tmp_path, upstream, tmp_path_factory, worker_id):
    first = (upstream.path.parent / "repro.txt").read_text()  # a new project's first `dvc repro`: every stage ran
    assert upstream.ran(first) == REPRODUCED
    # Each stage process was a warm server's child (tests/conftest.py), whichever worker built the upstream.
    root = run_root(tmp_path_factory, worker_id)
    served = "".join(log.read_text() for log in [*root.glob("*/warm-server.log"), *root.glob("warm-server.log")])
    assert {stage for stage in REPRODUCED if f"stages.{stage} in {upstream.path}: process" in served} == REPRODUCED
    sft = upstream.report("sft")
    assert {"val/loss", "val/perplexity", "perf/tokens_per_s", "perf/wall_s", "perf/peak_rss_mb"} <= set(sft)
    assert (upstream.path / "models/sft/model.safetensors").exists()
    assert (upstream.path / "models/sft/tokenizer.json").exists()
    assert abs(upstream.report("prepare")["train/gold_mean"]) < 0.15
    assert (upstream.path / "reports/plots/sft_loss.csv").read_text().startswith("step,")

    # MLflow: one pipeline (parent) run with the stage runs under it, tagged with DVC's own hashes.
    client = MlflowClient(f"sqlite:///{upstream.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("alignment")
    assert experiment.artifact_location == (upstream.path / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags["align.role"] == "group"]
    children = [r for r in runs if r.data.tags["align.role"] == "stage"]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == sorted(REPRODUCED)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert parents[0].data.params["sft.lr"] == str(float(sft and 1e-3))
    sft_run = next(r for r in children if r.info.run_name == "sft")
    lock = upstream.lock()
    sft_out = next(o for o in lock["sft"]["outs"] if o["path"] == "models/sft")
    assert sft_run.data.tags["dvc.out.models/sft"] == sft_out["md5"] == dvc_md5(upstream.path / "models/sft")
    assert sft_run.data.metrics["val/loss"] == pytest.approx(sft["val/loss"])
    assert sft_run.data.params["sft.max_steps"] == "8" and "prepare.n_train" not in sft_run.data.params
    assert len(client.get_metric_history(sft_run.info.run_id, "train/loss")) >= 4

    # In a copy (its own MLflow store): nothing changed, both stages are skipped.
    project = Project.copy_of(upstream.path, tmp_path / "repo")
    second = project.dvc("repro", "sft")
    assert project.ran(second) == set() and project.skipped(second) == {"prepare", "sft"}

    # Forcing sft again reproduces its metrics and its weights exactly (seeded, deterministic on CPU).
    project.dvc("repro", "-f", "-s", "sft")
    again = project.report("sft")
    assert {k: again[k] for k in DETERMINISTIC} == {k: sft[k] for k in DETERMINISTIC}
    assert {out["path"]: out["md5"] for out in project.lock()["sft"]["outs"]}["models/sft"] == sft_out["md5"]

    # A changed sft param reruns sft only.
    project.set_param("sft", "lr", 0.002)
    third = project.dvc("repro", "sft")
    assert project.ran(third) == {"sft"} and "prepare" in project.skipped(third)
    assert project.report("sft")["val/loss"] != sft["val/loss"]

    # An experiment: `dvc exp run -S` reruns sft only, and its metrics are listed by `dvc exp show`.
    project.commit("baseline")
    exp = project.dvc("exp", "run", "sft", "-S", "sft.lr=0.003", "-n", "lr3e-3")
    assert project.ran(exp) == {"sft"}
    shown = json.loads(project.dvc("exp", "show", "--json"))
    experiments = [rev for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]]
    named = next(rev for rev in experiments if rev["name"] == "lr3e-3")
    assert "val/loss" in named["data"]["metrics"]["reports/sft.json"]["data"]
    assert named["data"]["params"]["params.yaml"]["data"]["sft"]["lr"] == 0.003
    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    groups = {r.data.tags["align.run_group"] for r in runs}
    assert "lr3e-3" in groups
