"""Shared fixtures: offline hub, a tiny tokenizer and model config, a throwaway MLflow store."""

from __future__ import annotations

import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from pipeline.config import ModelConfig, TrainerConfig  # noqa: E402
from pipeline.data.tokenization import train_bpe_tokenizer  # noqa: E402
from pipeline.tasks.synthetic import generate_reviews  # noqa: E402
from pipeline.track.tracking import TrackingContext  # noqa: E402

# The longest tests (a whole DAG or more each) start first. pytest-xdist's worksteal hands a worker that ran out only
# tests not yet started, so one of these started last would leave the other worker idle until it ends.
LONGEST_FIRST = ("e2e/test_pipeline.py", "e2e/test_shared_sweep.py", "e2e/test_mlflow_server.py", "e2e/test_presets.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every other test keeps its place


@pytest.fixture(scope="session")
def reviews():
    return generate_reviews(400, random.Random(0), frac_positive=0.4, frac_negative=0.4)


@pytest.fixture(scope="session")
def tokenizer(reviews):
    return train_bpe_tokenizer([r.prompt + r.completion for r in reviews], vocab_size=1000)


@pytest.fixture
def model_cfg() -> ModelConfig:
    return ModelConfig(
        base="scratch", trust_remote_code=False, n_layer=2, n_head=2, n_embd=32, n_positions=128, dropout=0.0,
        chat_template="auto", lora_r=0, lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear",
    )


@pytest.fixture
def cpu_trainer_cfg() -> TrainerConfig:
    return TrainerConfig(
        accelerator="cpu", devices=1, strategy="auto", precision="32-true", num_nodes=1, log_every_n_steps=1,
        accumulate_grad_batches=1, gradient_checkpointing=False, compile=False, checkpoint_every_n_steps=0,
        keep_checkpoints=False,
    )


@pytest.fixture
def tracking(tmp_path) -> TrackingContext:
    return TrackingContext(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment_name="test",
        artifact_root=(tmp_path / "mlartifacts").as_uri(),
        run_group="test-group",
        git_sha="0" * 40,
    )
