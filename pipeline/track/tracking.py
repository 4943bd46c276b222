"""MLflow tracking: the only module that imports mlflow.

One pipeline run (a `dvc repro`, or one `dvc exp run` experiment) is one *parent* run; every stage that executes
opens a *child* run under it carrying the stage's params, per-step metrics, small artifacts and tags (stage, git
sha, DVC hashes of what it read and wrote, MLflow's standard source tags, the facts that decide reproducibility),
its input tables as MLflow datasets (digest = the DVC md5), sample completions as MLflow tables, and system metrics
(CPU / GPU utilisation and memory). Model weights stay in DVC.

The store defaults to `sqlite:///<repo root>/mlflow.db` with the root taken from `$DVC_ROOT` (DVC sets it to the
real repository also in `dvc exp run --temp/--queue` runs, whose working directory is deleted afterwards), and
the experiment is created with an absolute `file://` artifact location for the same reason. `MLFLOW_TRACKING_URI`
overrides the store (a `mlflow server` on 127.0.0.1, or a remote one). Stage processes may share a SQLite store
(`dvc queue start -j N`): MLflow waits out a busy database, and a store is created (its schema migrations) by one
process at a time under `<store>.lock`. Nothing here reads the process environment: callers pass it in, which keeps
this module testable and its inputs explicit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "alignment"
HEALTH_TIMEOUT_S = 5.0
STORE_LOCK_TIMEOUT_S = 600.0
TRUNCATED = "...[truncated]"
ROLE_TAG, GROUP_TAG, STAGE_TAG = "align.role", "align.run_group", "align.stage"


@dataclass(frozen=True)
class TrackingContext:
    """Where and under which pipeline run a stage logs."""

    tracking_uri: str
    experiment_name: str
    artifact_root: str
    run_group: str
    git_sha: str


def resolve_context(env: Mapping[str, str], cwd: Path, params_text: str) -> TrackingContext:
    """Decide store, experiment and run group from the environment a stage was started with.

    Args:
        env: the stage process's environment (`DVC_ROOT`, `DVC_EXP_NAME`, `DVC_EXP_BASELINE_REV`,
            `MLFLOW_TRACKING_URI`, `ALIGN_MLFLOW_EXPERIMENT`, `ALIGN_RUN_GROUP` are read).
        cwd: the working directory, the root when not run by DVC.
        params_text: the params file's text; its hash names the run group of a plain `dvc repro`.
    """
    root = Path(env.get("DVC_ROOT") or cwd).resolve()
    uri = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    git_sha = env.get("DVC_EXP_BASELINE_REV") or _git_head(root)
    params_hash = hashlib.sha256(params_text.encode()).hexdigest()[:8]
    group = env.get("ALIGN_RUN_GROUP") or env.get("DVC_EXP_NAME") or f"repro-{git_sha[:7]}-{params_hash}"
    return TrackingContext(
        tracking_uri=uri,
        experiment_name=env.get("ALIGN_MLFLOW_EXPERIMENT") or DEFAULT_EXPERIMENT,
        artifact_root=(root / "mlartifacts").as_uri(),
        run_group=group,
        git_sha=git_sha,
    )


def _git_head(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "nogit"
    return out.stdout.strip()


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; raised before a stage does any work."""


def check_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """An http(s) tracking store must answer (any HTTP status counts) within `timeout` seconds, so a stage fails
    at once, naming the URI, instead of after minutes of client retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (behind auth, or a proxy without /health): reachable
    except (OSError, urllib.error.URLError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingUnavailable(
            f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({reason}). Start it (`make ui` serves "
            "http://127.0.0.1:5000), fix the URI, or unset MLFLOW_TRACKING_URI to log to the project's "
            "sqlite:///<repo>/mlflow.db"
        ) from None


def server_lost(error: BaseException) -> bool:
    """Whether `error` is MLflow's client giving up on an http(s) tracking server mid-stage (refused, reset or timed
    out, or answering 5xx past its retries: "API request to ... failed with ..."), not a request the server answered
    and rejected."""
    return isinstance(error, MlflowException) and str(error).startswith("API request to ")


def lost_server_message(uri: str, error: BaseException) -> str:
    """The one line a stage fails with when its tracking server stops answering while it runs."""
    reason = str(error).splitlines()[0]
    reason = reason if len(reason) <= 300 else reason[:300] + TRUNCATED
    return f"MLFLOW_TRACKING_URI={uri}: the tracking server stopped answering while the stage ran ({reason})"


def training_runs_url(base: str, experiment_name: str) -> str:
    """The MLflow UI's page of the experiment's training runs (`base`: the server's URL). MLflow 3's UI opens an
    experiment on its GenAI view (traces) unless the URL asks for the training view; an unknown or unreachable
    experiment gives the experiments list in that view."""
    path = "experiments"
    query = urllib.parse.urlencode({"experiment_name": experiment_name})
    url = f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}"
    with contextlib.suppress(OSError, ValueError, KeyError), urllib.request.urlopen(url, timeout=5) as answer:
        path = f"experiments/{json.load(answer)['experiment']['experiment_id']}"
    return f"{base}/#/{path}?workflowType=machine_learning"


def open_store(uri: str) -> MlflowClient:
    """A client of the store at `uri`. A SQLite store is opened (so created and its schema migrated, if it is new)
    under a file lock beside it: processes that start together on a store nobody has created yet (queued sweep
    points) otherwise race MLflow's migrations, and all but one fail."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock", timeout=STORE_LOCK_TIMEOUT_S):
        return MlflowClient(tracking_uri=uri)  # opens the store eagerly


def mark_killed(client: MlflowClient, experiment_id: str, group: str, stage: str) -> list[str]:
    """Runs of this stage and pipeline run still `RUNNING` belong to a killed process: mark them KILLED."""
    query = f"tags.`{GROUP_TAG}` = '{group}' and tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING'"
    stale = [run.info.run_id for run in client.search_runs([experiment_id], filter_string=query)]
    for run_id in stale:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return stale


def mark_orphaned(client: MlflowClient, run_ids: Sequence[str]) -> list[str]:
    """The runs of a stage whose process died without ending them (its run, its pipeline run): those still `RUNNING`
    are marked KILLED; the ids marked."""
    marked = []
    for run_id in run_ids:
        with contextlib.suppress(MlflowException):  # deleted meanwhile: nothing to mark
            if client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
                client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
                marked.append(run_id)
    return marked


# MLflow 3 opens an experiment on its GenAI (traces) view unless its kind says it holds training runs.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "RLHF / DPO pipeline runs. Each **pipeline run** (a `dvc repro` or `dvc exp run`; tag `align.role = group`) "
        "is a parent whose children are its stages (prepare, sft, preferences, reward, reference, dpo, ppo, "
        "evaluate); the parent holds every param and the headline metrics (`dpo/gold_score`, `ppo/kl`, ...).\n\n"
        "Compare pipeline runs: filter `tags.align.role = 'group'`, select runs, *Compare*. Compare one stage "
        "across runs: `tags.align.stage = 'dpo'`. From a shell: `dvc exp show`, `make frontier`."
    ),
}


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str) -> str:
    """Get or create the experiment (absolute artifact location, `EXPERIMENT_TAGS`); tolerate a concurrent create."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        with contextlib.suppress(MlflowException):  # a concurrent stage may create it first
            client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_TAGS)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise MlflowException(f"MLflow experiment {name!r} could not be created")
    for key, value in EXPERIMENT_TAGS.items():  # an experiment created by an earlier version has none
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


# What a store says when two writers insert the same row at once: PostgreSQL, SQLite, MySQL.
DUPLICATE_ROW = ("duplicate key value violates unique constraint", "UNIQUE constraint failed", "Duplicate entry")
LOG_INPUTS_ATTEMPTS = 3


def log_inputs(client: MlflowClient, run_id: str, inputs: Sequence[Any]) -> None:
    """`client.log_inputs`, safe when several runs log the same new dataset at once (a `-j N` sweep's stages share
    their inputs). MLflow's store looks a dataset up by (experiment, name, digest) and inserts it when missing; two
    concurrent writers both miss it and one insert fails on the primary key (PostgreSQL, seen at `-j 2`). That
    transaction is rolled back whole, and a retry finds the dataset the other writer committed."""
    for attempt in range(LOG_INPUTS_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=list(inputs))
            return
        except MlflowException as error:
            if attempt + 1 == LOG_INPUTS_ATTEMPTS or not any(m in str(error) for m in DUPLICATE_ROW):
                raise


def ensure_parent_run(client: MlflowClient, experiment_id: str, ctx: TrackingContext, params: Mapping[str, Any]) -> str:
    """Find the pipeline run of `ctx.run_group`, or create it with all params. It spans its stages: it starts with
    the first one, each stage sets it RUNNING, and each stage's end ends it FINISHED (FAILED when the stage failed),
    so it ends with the last stage."""
    query = f"tags.`{GROUP_TAG}` = '{ctx.run_group}' and tags.`{ROLE_TAG}` = 'group'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=ctx.run_group,
        tags={ROLE_TAG: "group", GROUP_TAG: ctx.run_group, "git.sha": ctx.git_sha, **source_tags(ctx, "dvc.yaml")},
    )
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def source_tags(ctx: TrackingContext, source: str) -> dict[str, str]:
    """MLflow's standard source tags, so the UI shows where a run came from."""
    return {"mlflow.source.name": source, "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": ctx.git_sha}


def param_value(value: Any) -> str:
    """A param as MLflow stores it: text, cut to MLflow's length limit with a visible marker (a long chat template,
    say), never rejected."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = str(value)
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    return text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED


@dataclass(frozen=True)
class TableInput:
    """An input table of a stage as an MLflow dataset: its name, the DVC md5 as the digest, where it lives, its
    columns (name -> type) and its row count."""

    name: str
    digest: str
    source: str
    columns: Mapping[str, str]
    num_rows: int
    context: str


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


class StageRun:
    """The child run of one stage; a context manager that ends the run FINISHED, or FAILED on an exception.

    Args:
        ctx: where to log.
        stage: the stage name (as in dvc.yaml).
        stage_params: the params the stage reads, flattened (`sft.lr`, `model.base`, ...).
        all_params: every params key, flattened, for the parent run.
        run_id: attach to an existing run instead of creating one (DDP ranks > 0 get rank 0's id).
        resume_run_id: continue this run (a stage resuming from a checkpoint): it is set RUNNING again and its
            metric steps go on, instead of a new run being created.
        tags: more tags for the run (the machine facts, say).
        system_metrics: sample CPU / GPU utilisation and memory into `system/*` metrics while the run is open
            (MLflow's monitor; interval `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`, 10 s by default).
    """

    def __init__(
        self,
        ctx: TrackingContext,
        stage: str,
        stage_params: Mapping[str, Any],
        all_params: Mapping[str, Any],
        run_id: str | None = None,
        resume_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        system_metrics: bool = False,
    ) -> None:
        self.ctx, self.stage = ctx, stage
        self._tags = dict(tags or {})
        self._system_metrics = system_metrics
        self._monitor: Any = None
        self._stage_params, self._all_params = stage_params, all_params
        self.client = open_store(ctx.tracking_uri)
        self.run_id = run_id or ""
        self._owner = run_id is None
        self._resume_run_id = resume_run_id
        self.killed: list[str] = []

    def __enter__(self) -> StageRun:
        if not self._owner:
            return self
        check_reachable(self.ctx.tracking_uri)
        experiment_id = ensure_experiment(self.client, self.ctx.experiment_name, self.ctx.artifact_root)
        parent_id = ensure_parent_run(self.client, experiment_id, self.ctx, self._all_params)
        self.client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
        if self._resume_run_id and self._resumable(self._resume_run_id):
            self.run_id, self.parent_run_id = self._resume_run_id, parent_id
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.client.set_tag(self.run_id, "align.resumed", "true")
            self._start_monitor(resume=True)
            return self
        self.killed = mark_killed(self.client, experiment_id, self.ctx.run_group, self.stage)
        tags = {
            "mlflow.parentRunId": parent_id,
            ROLE_TAG: "stage",
            GROUP_TAG: self.ctx.run_group,
            STAGE_TAG: self.stage,
            "git.sha": self.ctx.git_sha,
            **source_tags(self.ctx, f"stages/{self.stage}.py"),
            **self._tags,
        }
        run = self.client.create_run(experiment_id, run_name=self.stage, tags=tags)
        self.run_id = run.info.run_id
        self.parent_run_id = parent_id
        _log_params(self.client, self.run_id, self._stage_params)
        self._start_monitor(resume=False)
        return self

    def _start_monitor(self, resume: bool) -> None:
        if not self._system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.ctx.tracking_uri)
        self._monitor.start()

    def _stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        monitor.finish()
        if monitor._logging_step == 0:  # a stage shorter than one sampling interval: one sample at its end
            with contextlib.suppress(Exception):  # system metrics never fail a stage
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()

    def _resumable(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False  # another store, or the run was deleted: start a new one
        return run.data.tags.get(STAGE_TAG) == self.stage and run.data.tags.get(GROUP_TAG) == self.ctx.run_group

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._monitor is not None:
            self._stop_monitor()
        if not self._owner:
            return
        status = RunStatus.to_string(RunStatus.FINISHED if kind is None else RunStatus.FAILED)
        # A stage failing on a lost server cannot mark its run FAILED there either: its own error is the one to see
        # (the run stays RUNNING until the stage's rerun continues it, or a later stage marks it KILLED).
        lost = error is not None and server_lost(error)
        with contextlib.suppress(MlflowException) if lost else contextlib.nullcontext():
            self.client.set_terminated(self.run_id, status)
            self.client.set_terminated(self.parent_run_id, status)  # the pipeline run ends with its latest stage

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        """Log numeric metrics (non-numbers are skipped) to this run, or to `run_id` (the parent, say)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step or 0)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id or self.run_id, metrics=items[start : start + 500])

    def set_tags(self, tags: Mapping[str, str], run_id: str | None = None) -> None:
        """Set tags on this run, or on `run_id` (the parent, say)."""
        for key, value in tags.items():
            self.client.set_tag(run_id or self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, table: Any, artifact_file: str) -> None:
        """A DataFrame (sample completions, say) as an MLflow table: the UI compares tables across runs."""
        self.client.log_table(self.run_id, table, artifact_file)

    def log_tables(self, tables: Sequence[TableInput]) -> None:
        """The stage's input tables as MLflow datasets (the run's "Datasets used"), DVC md5 as the digest."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=t.name,
                    digest=t.digest[:36],
                    source_type="local",
                    source=json.dumps({"uri": t.source}),
                    schema=json.dumps({"mlflow_colspec": [{"name": c, "type": k} for c, k in t.columns.items()]}),
                    profile=json.dumps({"num_rows": t.num_rows}),
                ),
                tags=[InputTag("mlflow.data.context", t.context)],
            )
            for t in tables
        ]
        if inputs:
            log_inputs(self.client, self.run_id, inputs)
            log_inputs(self.client, self.parent_run_id, inputs)  # the pipeline's inputs, on its run

    def lightning_logger(self) -> Any:
        """A Lightning `MLFlowLogger` bound to this run (URI passed explicitly; it only logs from rank 0)."""
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(
            experiment_name=self.ctx.experiment_name,
            tracking_uri=self.ctx.tracking_uri,
            run_id=self.run_id,
            log_model=False,
        )


def pipeline_runs(tracking_uri: str, experiment_name: str) -> list[dict[str, Any]]:
    """Every finished pipeline run (parent) that carries evaluation metrics: run_group, params, metrics (its
    evaluate stage's, which include every policy's length and EOS rate, under the parent's headline ones), tags
    (the parent's: a tripped gate's among them)."""
    client = open_store(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'group'", max_results=5000
    )
    # The evaluate stage's own run holds every evaluation metric; the parent only the headline ones.
    query = f"tags.`{STAGE_TAG}` = 'evaluate' and attributes.status = 'FINISHED'"
    evaluations = client.search_runs(
        [experiment.experiment_id], filter_string=query, max_results=5000, order_by=["attributes.end_time ASC"]
    )
    evaluated = {run.data.tags.get(GROUP_TAG): dict(run.data.metrics) for run in evaluations}  # the latest wins
    return [
        {
            "run_group": run.data.tags.get(GROUP_TAG, run.info.run_name),
            "params": dict(run.data.params),
            "metrics": {**evaluated.get(run.data.tags.get(GROUP_TAG), {}), **run.data.metrics},
            "tags": dict(run.data.tags),
        }
        for run in runs
        if "sft/gold_score" in run.data.metrics
    ]
