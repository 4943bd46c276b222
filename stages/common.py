"""What every stage entry point shares: argv, params, seeding, the MLflow stage run, DDP rank handling.

This is the one place (with the stage scripts) that reads `sys.argv`, `params.yaml` and the environment; the
`pipeline` package gets everything as arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from pipeline.config import Config, flatten, load_config, read_params
from pipeline.io import dvc_md5, write_json
from pipeline.tracking import StageRun, resolve_context

RUN_ID_ENV = "ALIGN_MLFLOW_RUN_ID"
# A tracking server that dies mid-stage: MLflow's client retries 7 times with backoff (minutes) by default.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@dataclass
class StageContext:
    name: str
    args: argparse.Namespace
    config: Config
    run: StageRun

    @property
    def rank(self) -> int:
        return _rank()


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def inference_device() -> torch.device:
    """Where the no-grad stages (sampling, scoring, judging) run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_args(stage: str, paths: dict[str, str]) -> argparse.Namespace:
    """`--params` plus one `--<name>` option per input/output path (defaults as in dvc.yaml)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"The {stage} stage.")
    parser.add_argument("--params", default="params.yaml", help="params file")
    for name, default in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    return parser.parse_args()


@contextlib.contextmanager
def stage(name: str, sections: list[str], paths: dict[str, str]) -> Iterator[StageContext]:
    """Parse argv, load and validate params, seed, and open the stage's MLflow run (rank 0 creates it)."""
    args = parse_args(name, paths)
    params_text = Path(args.params).read_text() if Path(args.params).exists() else ""
    config = load_config(read_params(args.params))
    pl.seed_everything(config.seed, workers=True, verbose=False)
    all_params = flatten(config)
    stage_params = {k: v for k, v in all_params.items() if k.split(".")[0] in sections}
    ctx = resolve_context(os.environ, Path.cwd(), params_text)
    run_id = os.environ.get(RUN_ID_ENV) if _rank() != 0 else None
    with StageRun(ctx, name, stage_params, all_params, run_id=run_id) as run:
        if run.killed:
            print(f"{name}: marked {len(run.killed)} run(s) left RUNNING by a killed process as KILLED")
        # Lightning's DDP launcher re-runs this script per rank with this environment: ranks > 0 join this run.
        os.environ[RUN_ID_ENV] = run.run_id
        yield StageContext(name, args, config, run)


def finish(ctx: StageContext, metrics: dict[str, float], report: str, outputs: list[str], step: int = 0) -> None:
    """Write the stage's DVC metrics file; log metrics (at the last step) and its outputs' DVC hashes to MLflow."""
    write_json(metrics, report)
    ctx.run.log_metrics(metrics, step=step)
    ctx.run.set_tags({f"dvc.out.{path}": dvc_md5(path) for path in outputs if Path(path).exists()})
    ctx.run.log_artifact(report)
