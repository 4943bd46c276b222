import dataclasses

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.test_sft import _fit


@pytest.mark.slow
def test_sft_under_ddp_spawn_on_two_cpu_processes(model_cfg, cpu_trainer_cfg, tokenizer, reviews, tracking):
    from pipeline.track.tracking import StageRun

    ddp = dataclasses.replace(cpu_trainer_cfg, devices=2, strategy="ddp_spawn")
    with StageRun(tracking, "sft", {}, {}) as run:
        module, before, _, _ = _fit(model_cfg, ddp, tokenizer, reviews, run.lightning_logger(), steps=4)
    assert any(not p.equal(before[n]) for n, p in module.named_parameters())  # rank 0's weights came back
    client = MlflowClient(tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 2  # the parent and one stage run: only rank 0 logged
    assert len(client.get_metric_history(run.run_id, "train/loss")) == 4
