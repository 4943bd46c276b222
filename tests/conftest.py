"""Shared fixtures: offline hub, a tiny tokenizer and model config, a throwaway MLflow store.

The fixtures import the pipeline (torch, transformers, MLflow: ~5 s) when first used, not here: under pytest-xdist
the controller loads this file before it starts any worker and runs no test itself, so every run waited that long
for nothing (docs/benchmarks.md). The annotations name their types for type checkers only (TYPE_CHECKING)."""

from __future__ import annotations

from tests.environment import start_warm_server  # first: offline, and the environment before any library is imported

# isort: split
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.defaults import ROOT
from tools.warm import SOCKET_ENV  # the standard library only

if TYPE_CHECKING:
    from pipeline.config import ModelConfig, TrainerConfig
    from pipeline.track.tracking import TrackingContext


# The longest tests (a whole DAG or more each) start first. pytest-xdist's worksteal hands a worker that ran out only
# tests not yet started, so one of these started last would leave the other worker idle until it ends.
LONGEST_FIRST = ("e2e/test_pipeline.py", "e2e/test_shared_sweep.py", "e2e/test_mlflow_server.py", "e2e/test_presets.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every other test keeps its place


@pytest.fixture(scope="session", autouse=True)
def warm_stage_starts(request, tmp_path_factory):
    """Where slow tests run (the fast tier launches no stage), the stage processes this worker's tests launch start
    as forks of one warm server (tools/warm.py): ~0.1 s each instead of 7-10 s of imports, for about 100 stage
    processes. Yields the server's log (one line per stage it started, one per stage that started cold and why).
    The resume tests drop `STAGES_WARM_SOCKET` from the run they kill: that stage starts cold."""
    if not any(item.get_closest_marker("slow") for item in request.session.items):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="warm-"))  # a Unix socket's path holds at most 107 bytes
    log = tmp_path_factory.getbasetemp() / "warm-server.log"
    server = start_warm_server(folder / "stages.sock", log, cwd=ROOT)
    os.environ[SOCKET_ENV] = str(folder / "stages.sock")
    yield log
    del os.environ[SOCKET_ENV]
    server.terminate()
    server.wait(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def reviews():
    from pipeline.tasks.synthetic import generate_reviews

    return generate_reviews(400, random.Random(0), frac_positive=0.4, frac_negative=0.4)


@pytest.fixture(scope="session")
def tokenizer(reviews):
    from pipeline.data.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer([r.prompt + r.completion for r in reviews], vocab_size=1000)


@pytest.fixture
def model_cfg() -> ModelConfig:
    from pipeline.config import ModelConfig

    return ModelConfig(
        base="scratch",
        trust_remote_code=False,
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=128,
        dropout=0.0,
        chat_template="auto",
        lora_r=0,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
    )


@pytest.fixture
def cpu_trainer_cfg() -> TrainerConfig:
    from pipeline.config import TrainerConfig

    return TrainerConfig(
        accelerator="cpu",
        devices=1,
        strategy="auto",
        precision="32-true",
        num_nodes=1,
        log_every_n_steps=1,
        accumulate_grad_batches=1,
        gradient_checkpointing=False,
        compile=False,
        checkpoint_every_n_steps=0,
        keep_checkpoints=False,
    )


@pytest.fixture
def tracking(tmp_path) -> TrackingContext:
    from pipeline.track.tracking import TrackingContext

    return TrackingContext(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment_name="test",
        artifact_root=(tmp_path / "mlartifacts").as_uri(),
        run_group="test-group",
        git_sha="0" * 40,
    )
