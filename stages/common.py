"""What every stage entry point shares, `stage()` in named steps: read argv and params (`_read`), seed and open the
MLflow stage run (`_run`), hold the stage's checkpoint folder (`_held`, `_checkpoints`, from `stages/checkpoints.py`),
start the watcher that marks a killed stage's runs KILLED (`_reaper`, `stages/reaper.py`), run the stage's pipeline
call with its `Hooks`, and write its outputs atomically; DDP rank handling and the one-line exits (`run_main`).

This is the one place (with the stage scripts) that reads `sys.argv`, `params.yaml` and the environment; the
`pipeline` package gets everything as arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from pipeline.config import Config, flatten, load_config, read_params
from pipeline.files import dvc_md5, write_json
from pipeline.methods.outcome import Outcome
from pipeline.track.provenance import input_tables, machine_tags
from pipeline.track.tracking import (
    StageRun,
    TrackingContext,
    TrackingUnavailable,
    lost_server_message,
    resolve_context,
    server_lost,
)
from pipeline.train.hooks import Hooks
from stages import interpreter_exit
from stages.checkpoints import Checkpoints, checkpoint_key

RUN_ID_ENV = "ALIGN_MLFLOW_RUN_ID"
CHECKPOINTS_BUSY_ENV = "ALIGN_CHECKPOINTS_BUSY"  # rank 0 tells DDP ranks > 0 it runs without checkpoints
# A tracking server that dies mid-stage: MLflow's client retries 7 times with backoff (minutes) by default.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass
class StageContext:
    name: str
    args: argparse.Namespace
    config: Config
    run: StageRun
    checkpoints: Checkpoints
    resume_from: str | None = None
    """The checkpoint this run continues from, if any."""

    @property
    def rank(self) -> int:
        return _rank()

    def hooks(self) -> Hooks:
        """What a training method gets from this stage: its MLflow logger, checkpoint folder, resume point and rank."""
        checkpoints = self.checkpoints if self.checkpoints.every_n else None
        return Hooks(self.run.lightning_logger(), checkpoints, self.run.run_id, self.resume_from, self.rank)


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's `main` and, once it has returned, end the process without tearing the interpreter down.

    A stage that returned has written its outputs (atomically) and ended its MLflow run. This runs the normal
    shutdown's own steps, in its order: join the non-daemon threads, run the `atexit` handlers (MLflow's flushes,
    Lightning's NCCL teardown on GPUs), flush stdout and stderr. `os._exit` then skips only the teardown of every
    module and object torch, transformers, MLflow and Lightning created: 1.6-1.9 s of each stage process (measured;
    docs/benchmarks.md), spent freeing memory the OS reclaims anyway. A stage that raises (or calls `sys.exit`)
    leaves the normal way, with its traceback and exit status; one whose tracking server does not answer, at its start
    or mid-way, with the one-line error that names the URI and says what a rerun will do."""
    try:
        main()
    except TrackingUnavailable as error:
        sys.exit(str(error))  # one line: the store's URI, what happened, what to do; no traceback to read through
    interpreter_exit()
    os._exit(0)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch as Lightning's `seed_everything(seed, workers=True)` does, with the environment
    variables its Trainer reads (`PL_GLOBAL_SEED`, `PL_SEED_WORKERS`), without importing Lightning: the stages that
    train nothing never load it (about 0.7 s of their start, measured; docs/benchmarks.md)."""
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PL_SEED_WORKERS"] = "1"


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def parse_args(stage: str, paths: dict[str, str]) -> argparse.Namespace:
    """`--params` plus one `--<name>` option per input/output path (defaults as in dvc.yaml)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"The {stage} stage.")
    parser.add_argument("--params", default="params.yaml", help="params file")
    for name, default in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    return parser.parse_args()


PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where dvc.yaml lives beside this stages/ package


def tracked_params(name: str, dvc_yaml: str | Path = PROJECT_ROOT / "dvc.yaml") -> list[str]:
    """The params sections and keys `dvc.yaml` lists for stage `name`: its cache key, and what its MLflow run logs.
    Read from the `dvc.yaml` beside this code (a stage may run from another directory: `--params` points there)."""
    return list(yaml.safe_load(Path(dvc_yaml).read_text())["stages"][name]["params"])


@contextlib.contextmanager
def stage(name: str, paths: dict[str, str], inputs: tuple[str, ...] = ()) -> Iterator[StageContext]:
    """The stage's runtime, in its steps: read argv and params (and seed), hash the inputs, hold the checkpoint folder
    and find the checkpoint to resume from, watch for this process's death, then open the MLflow run (rank 0 creates
    it, or continues the checkpoint's run) and hand the stage its context.

    Args:
        inputs: the `paths` keys the stage reads: their DVC hashes key its checkpoints and go to MLflow (`dvc.dep.*`
            tags; the parquet tables among them as datasets).
    """
    args, params = _read(name, paths)
    ctx = resolve_context(os.environ, Path.cwd(), params.text)
    input_paths = [getattr(args, key) for key in inputs]
    hashes = {path: dvc_md5(path) for path in input_paths if Path(path).exists()}
    with _held(_checkpoints(name, params, hashes)) as checkpoints, _reaper(ctx.tracking_uri) as reaper:
        resume_from = checkpoints.latest() if checkpoints.every_n else None
        with (
            _failing_in_one_line(name, ctx.tracking_uri, checkpoints),
            _run(name, ctx, params, checkpoints, resume_from) as run,
        ):
            if _rank() == 0:
                run.log_tables(input_tables(input_paths))
                run.set_tags({f"dvc.dep.{path}": md5 for path, md5 in hashes.items()})
            _say(name, run, checkpoints, resume_from)
            if reaper is not None:  # the stage's process owns the run: marked KILLED if it dies without ending it
                reaper.write(f"run {run.run_id} {run.parent_run_id}\n")
                reaper.flush()
            # Lightning's DDP launcher re-runs this script per rank with this environment: ranks > 0 join this run.
            os.environ[RUN_ID_ENV] = run.run_id
            resumed = str(resume_from) if resume_from else None
            yield StageContext(name, args, params.config, run, checkpoints, resumed)


@dataclass(frozen=True)
class _Params:
    text: str
    """The params file as written (its hash names a plain `dvc repro`'s pipeline run)."""
    config: Config
    every: dict[str, Any]
    """Every key, flattened: the pipeline run's params."""
    tracked: dict[str, Any]
    """The keys `dvc.yaml` lists for the stage: its cache key, its checkpoints' key and its MLflow run's params."""


def _read(name: str, paths: dict[str, str]) -> tuple[argparse.Namespace, _Params]:
    """argv and the params file, validated; the seed set; MLflow's client told to give up on a dead server soon."""
    args = parse_args(name, paths)
    for key, value in MLFLOW_CLIENT_ENV.items():  # set when a stage starts, not when this module is imported
        os.environ.setdefault(key, value)
    text = Path(args.params).read_text() if Path(args.params).exists() else ""
    config = load_config(read_params(args.params))
    seed_everything(config.seed)
    every = flatten(config)
    tracked = tracked_params(name)  # a runtime knob is in none: it keys no checkpoint either
    stage_params = {k: v for k, v in every.items() if any(k == t or k.startswith(f"{t}.") for t in tracked)}
    return args, _Params(text, config, every, stage_params)


def _run(
    name: str, ctx: TrackingContext, params: _Params, checkpoints: Checkpoints, resume_from: Path | None
) -> StageRun:
    """The stage's MLflow run: rank 0's, new or the checkpoint's continued; ranks > 0 join rank 0's under Lightning's
    launcher, and under torchrun (started apart, on other nodes) have no id and log nothing."""
    system_metrics = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() not in ("0", "false")
    return StageRun(
        ctx,
        name,
        params.tracked,
        params.every,
        run_id=os.environ.get(RUN_ID_ENV, "") if _rank() != 0 else None,
        resume_run_id=checkpoints.run_id(resume_from) if resume_from else None,
        tags=machine_tags(),
        system_metrics=system_metrics and _rank() == 0,
    )


def _say(name: str, run: StageRun, checkpoints: Checkpoints, resume_from: Path | None) -> None:
    """What the stage's start did to earlier runs, and where it resumes."""
    if run.killed:
        print(f"{name}: marked {len(run.killed)} run(s) left RUNNING by a killed process as KILLED")
    if resume_from is not None:
        step = checkpoints.step(resume_from)
        where = (
            f"at the end of training (step {step}): no step is trained again"
            if checkpoints.is_final(resume_from)
            else f"from step {step}"
        )
        print(f"resuming {name} {where} ({resume_from}), MLflow run {run.run_id}")


@contextlib.contextmanager
def _failing_in_one_line(name: str, uri: str, checkpoints: Checkpoints) -> Iterator[None]:
    """A tracking server that stops answering while the stage runs fails it as one that is down at its start does
    (`TrackingUnavailable`, one line naming `MLFLOW_TRACKING_URI`), saying what a rerun will do."""
    try:
        yield
    except Exception as error:
        if not server_lost(error):
            raise
        raise TrackingUnavailable(f"{lost_server_message(uri, error)}. {_rerun(name, checkpoints)}") from None


def _rerun(name: str, checkpoints: Checkpoints) -> str:
    """What rerunning a stage that stopped mid-way will do: resume from its newest checkpoint, or start over."""
    latest = checkpoints.latest() if checkpoints.every_n else None
    rerun = f"Start it again and rerun the stage (`dvc repro {name}`)"
    if latest is None:
        return f"{rerun}: it starts over, as it wrote no checkpoint (trainer.checkpoint_every_n_steps)"
    step = checkpoints.step(latest)
    return f"{rerun}: it resumes from its checkpoint at step {step} ({latest}) in the same MLflow run"


@contextlib.contextmanager
def _reaper(tracking_uri: str) -> Iterator[IO[str] | None]:
    """On rank 0, `python -m stages.reaper` in a session of its own, told the stage's runs through a pipe and told
    `closed` once they are ended (stages/reaper.py): a stage killed before that leaves no run RUNNING. Yields the
    pipe (None on ranks > 0, which own no run)."""
    if _rank() != 0:
        yield None
        return
    reaper = subprocess.Popen(
        [sys.executable, "-m", "stages.reaper", tracking_uri],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        yield reaper.stdin
    finally:
        with contextlib.suppress(BrokenPipeError):  # it died itself: it would have had nothing to do
            reaper.stdin.write("closed\n")
            reaper.stdin.close()


@contextlib.contextmanager
def _held(checkpoints: Checkpoints) -> Iterator[Checkpoints]:
    """Rank 0 holds the stage's checkpoint folder (`Checkpoints.hold`); DDP ranks > 0 follow its answer."""
    if _rank() != 0:
        yield checkpoints.inert() if os.environ.get(CHECKPOINTS_BUSY_ENV) == "1" else checkpoints
        return
    with checkpoints.hold() as held:
        busy = held != checkpoints
        if busy and checkpoints.every_n:
            print(
                f"another process is running this same stage and holds {checkpoints.directory}: this one runs "
                "without mid-stage checkpoints"
            )
        os.environ[CHECKPOINTS_BUSY_ENV] = "1" if busy else "0"
        yield held


def _checkpoints(name: str, params: _Params, hashes: dict[str, str]) -> Checkpoints:
    """The stage's checkpoint folder under the real repository root (DVC's temp dirs for queued runs vanish)."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    trainer = params.config.trainer
    key = checkpoint_key(params.tracked, hashes)
    return Checkpoints(root / ".checkpoints" / name / key, trainer.checkpoint_every_n_steps, trainer.keep_checkpoints)


def finish(ctx: StageContext, outcome: Outcome, report: str, outputs: list[str]) -> None:
    """Write the stage's DVC metrics file; log its metrics (at the last step), tables, and its outputs' DVC hashes to
    MLflow; clear the checkpoints (the outputs are written: nothing is left to resume)."""
    write_json(outcome.metrics, report)
    ctx.run.log_metrics(outcome.metrics, step=outcome.step)
    for artifact_file, table in outcome.tables.items():
        ctx.run.log_table(table, artifact_file)
    ctx.run.set_tags({f"dvc.out.{path}": dvc_md5(path) for path in outputs if Path(path).exists()})
    if outcome.tags:  # a tripped gate shows on the stage's run and on the pipeline's
        ctx.run.set_tags(outcome.tags)
        ctx.run.set_tags(outcome.tags, run_id=ctx.run.parent_run_id)
    ctx.run.log_artifact(report)
    ctx.checkpoints.clear()
    print(f"{ctx.name}: {outcome.metrics}")
