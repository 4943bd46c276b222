"""The team workflow on one box: a sweep shared by two worker clones, over a PostgreSQL-backed MLflow server.

`make ui-postgres` starts PostgreSQL (as the `postgres` user when the test runs as root, as CI does) and the MLflow
server over it. A bare Git repository is the team's Git remote and a folder its DVC remote. The origin clone pushes
the reproduced upstream stages; each worker clones, pulls, queues its share of the points (worker A runs its two at
once, `dvc queue start -j 2`), and pushes its experiments with their cache and run-cache; an analyst clone pulls
every experiment and draws the frontier from the server. Then the MLflow server is stopped and a stage started
against it fails at once, naming MLFLOW_TRACKING_URI. Every server is started and stopped by its PID.

DVC's queue has an open race with more than one worker (treeverse/dvc#10673: a task can fail in DVC's own setup,
with no stage log). A worker re-queues a point DVC lost that way and runs it alone, as a real worker script would;
a stage of ours that fails (a FAILED MLflow run, a stage command that exited non-zero) fails the test at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from pipeline.track.tracking import log_inputs
from tests.e2e.conftest import UPSTREAM
from tests.e2e.project import ROOT, Project, free_port
from tests.e2e.test_pipeline import QUEUE_RACE

pytestmark = pytest.mark.slow

# name -> (worker, overrides). Worker A keeps the default seed (its upstream stages come from the DVC remote);
# worker B's seed reruns the whole tiny DAG once, and its second point reuses it through the run-cache.
POINTS = {
    "shared-s1234-b0.05": ("a", {"seed": "1234", "dpo.beta": "0.05"}),
    "shared-s1234-b0.3": ("a", {"seed": "1234", "dpo.beta": "0.3"}),
    "shared-s7-b0.05": ("b", {"seed": "7", "dpo.beta": "0.05"}),
    "shared-s7-b0.3": ("b", {"seed": "7", "dpo.beta": "0.3"}),
}
JOBS = {"a": 2, "b": 1}


@dataclass
class Servers:
    uri: str
    make: list[str]
    pids: dict[str, int]


@contextlib.contextmanager
def postgres_backed_mlflow() -> Iterator[Servers]:
    """`make ui-postgres` on free ports; both servers stopped (`make ui-stop postgres-stop`) and checked gone."""
    # The postgres user must reach PG_DIR: pytest's own temp folders are private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="align-pg-"))
    root.chmod(0o755)
    mlflow_port = free_port()
    make = [
        "make",
        "--no-print-directory",
        "-C",
        str(ROOT),
        f"MLFLOW_STORE={root}",
        f"MLFLOW_PORT={mlflow_port}",
        f"PG_DIR={root / 'pg'}",
        f"PG_PORT={free_port()}",
    ]
    try:
        started = subprocess.run([*make, "ui-postgres"], capture_output=True, text=True, timeout=400)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "PostgreSQL: postgresql+psycopg://mlflow@127.0.0.1:" in started.stdout, started.stdout
        pids = {
            "postgres": int((root / "pg/data/postmaster.pid").read_text().split()[0]),
            "mlflow": int((root / ".mlflow-server.pid").read_text()),
        }
        yield Servers(f"http://127.0.0.1:{mlflow_port}", make, pids)
    finally:
        stopped = subprocess.run([*make, "ui-stop", "postgres-stop"], capture_output=True, text=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
    assert stopped.returncode == 0 and "PostgreSQL stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    for name, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, not left running for the next test
        print(f"{name} (PID {pid}) stopped")


def _clone(remote: Path, path: Path, uri: str) -> Project:
    subprocess.run(["git", "clone", "-q", str(remote), str(path)], check=True, capture_output=True)
    project = Project.at(path)
    project.env["MLFLOW_TRACKING_URI"] = uri
    return project


def _run_share(project: Project, names: list[str], jobs: int, client: MlflowClient) -> list[str]:
    """Run the worker's points with `jobs` queue workers (re-queueing any DVC lost), then push them with their cache
    and run-cache. The queue status of each round."""
    rounds = project.run_points({name: POINTS[name][1] for name in names}, jobs, client)
    project.dvc("exp", "push", "--run-cache", "origin", *names)
    return rounds


def _one_dataset_from_many_writers(client: MlflowClient, writers: int = 8) -> None:
    """Stages of a `-j N` sweep log the same input table at the same moment. MLflow's store inserts a dataset it
    does not find, so on PostgreSQL some of such writers failed on its primary key (1 to 6 of 8 here; a dpo stage of
    this sweep did, in CI); `log_inputs` retries them. Every writer succeeds and every run lists the dataset."""
    experiment = client.create_experiment(f"datasets-{uuid.uuid4().hex[:8]}")
    table = Dataset(name="preferences/train", digest=uuid.uuid4().hex[:36], source_type="local", source="{}")
    inputs = [DatasetInput(table, tags=[InputTag("mlflow.data.context", "train")])]
    runs = [client.create_run(experiment).info.run_id for _ in range(writers)]
    together, errors = threading.Barrier(writers), []

    def write(run_id: str) -> None:
        together.wait()
        try:
            log_inputs(client, run_id, inputs)
        except Exception as error:  # reported below, with every writer's
            errors.append(repr(error)[:300])

    threads = [threading.Thread(target=write, args=(run_id,)) for run_id in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for run_id in runs:
        assert [d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs] == [table.digest]


def test_two_workers_share_one_sweep_over_a_postgres_backed_server(tmp_path, upstream):
    git_remote, dvc_remote = tmp_path / "team.git", tmp_path / "dvc-remote"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(git_remote)], check=True)
    origin = Project.copy_of(upstream.path, tmp_path / "origin")
    origin.run("git", "remote", "add", "origin", str(git_remote))
    origin.dvc("remote", "add", "-d", "team", str(dvc_remote))
    origin.commit("the team's remotes")
    origin.run("git", "push", "-q", "origin", "main")
    origin.dvc("push", "--run-cache")

    with postgres_backed_mlflow() as servers:
        client = MlflowClient(servers.uri)
        _one_dataset_from_many_writers(client)
        workers = {name: _clone(git_remote, tmp_path / f"worker-{name}", servers.uri) for name in JOBS}
        for worker in workers.values():
            worker.dvc("pull", "--run-cache", "--with-deps", *UPSTREAM)  # what origin reproduced
        shares = {w: [name for name, (owner, _) in POINTS.items() if owner == w] for w in JOBS}
        # One after the other: on this 2-core machine worker A's two queue workers already fill it.
        logs = {w: _run_share(project, shares[w], JOBS[w], client) for w, project in workers.items()}

        analyst = _clone(git_remote, tmp_path / "analyst", servers.uri)
        assert analyst.experiments("origin") == sorted(POINTS), logs  # every point pushed, each once
        analyst.dvc("exp", "pull", "origin", *POINTS)
        assert analyst.experiments() == sorted(POINTS)
        analyst.dvc("exp", "apply", "shared-s7-b0.3")  # its outputs come from the DVC remote, not from a rerun
        assert yaml.safe_load((analyst.path / "params.yaml").read_text())["dpo"]["beta"] == 0.3
        analyst.dvc("checkout")
        assert (analyst.path / "models/dpo/model.safetensors").exists()
        applied = analyst.report("metrics")

        # In the shared record, each point is one FINISHED pipeline run whose stage runs all FINISHED with metrics;
        # no stage of a point ran twice, and every point ran its own dpo and evaluate.
        experiment = client.get_experiment_by_name("alignment")
        runs = client.search_runs([experiment.experiment_id], max_results=500)
        for name in POINTS:
            mine = [r for r in runs if r.data.tags.get("align.run_group") == name]
            parents = [r for r in mine if r.data.tags["align.role"] == "group"]
            stages = [r for r in mine if r.data.tags["align.role"] == "stage"]
            assert len(parents) == 1 and parents[0].info.status == "FINISHED", name
            assert {"dpo/gold_score", "dpo/kl", "ppo/kl", "sft/gold_score"} <= set(parents[0].data.metrics), name
            assert parents[0].data.params["dpo.beta"] == POINTS[name][1]["dpo.beta"], name
            if name == "shared-s7-b0.3":  # the point the analyst applied: its metrics file is the recorded run's
                assert parents[0].data.metrics["dpo/gold_score"] == pytest.approx(applied["dpo/gold_score"])
            names = [r.data.tags["align.stage"] for r in stages]
            assert len(names) == len(set(names)) and {"dpo", "evaluate"} <= set(names), (name, names)
            assert all(r.info.status == "FINISHED" and r.data.metrics for r in stages), name
        raced = len(logs["a"]) > 1  # DVC's race made one of worker A's points rerun alone: reported at the end
        if not raced:  # worker A's two points ran at once (-j 2): their stage runs overlap in time
            spans = []
            for name in shares["a"]:
                infos = [r.info for r in runs if r.data.tags.get("align.run_group") == name]
                spans.append((min(i.start_time for i in infos), max(i.end_time for i in infos)))
            (start_one, end_one), (start_two, end_two) = spans
            assert start_one < end_two and start_two < end_one, spans
        first = [r for r in runs if r.data.tags.get("align.run_group") == "shared-s7-b0.05"]
        whole = {r.data.tags.get("align.stage") for r in first}
        assert {"prepare", "sft", "reward"} <= whole  # the new seed's upstream ran once, for its first point

        frontier = analyst.run("python", "-m", "tools.frontier", "--group-prefix", "shared-")
        assert "frontier: 4 pipeline runs" in frontier, frontier
        rows = [line.split("|") for line in (analyst.path / "reports/frontier.md").read_text().splitlines()]
        dpo = {row[3].strip(): row[6].strip() for row in rows if len(row) > 6 and row[1].strip() == "dpo"}
        assert dpo == {"0.05": "2", "0.3": "2"}, dpo  # both values, each over both seeds
        assert (analyst.path / "reports/frontier.png").stat().st_size > 0

        # The server gone: a stage fails within seconds, naming the tracking URI, and writes nothing.
        assert (
            "MLflow UI stopped"
            in subprocess.run([*servers.make, "ui-stop"], capture_output=True, text=True, timeout=120).stdout
        )
        (analyst.path / "reports/prepare.json").unlink(missing_ok=True)
        began = time.monotonic()
        failed = subprocess.run(
            ["python", "-m", "stages.prepare"],
            cwd=analyst.path,
            env=analyst.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert failed.returncode != 0 and time.monotonic() - began < 60, failed.stderr[-3000:]
        assert f"MLFLOW_TRACKING_URI={servers.uri}: the tracking server does not answer" in failed.stderr
        assert not (analyst.path / "reports/prepare.json").exists()
    if raced:
        pytest.skip(QUEUE_RACE)
