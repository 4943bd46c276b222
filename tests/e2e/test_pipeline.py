"""The whole DAG on tiny params through real DVC: everything runs once, then only what a change feeds."""

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.project import Project

pytestmark = pytest.mark.slow
STAGES = {"prepare", "sft", "preferences", "reward", "reference", "dpo", "ppo"}


def test_whole_dag_then_targeted_reruns(tmp_path):
    project = Project(tmp_path / "repo")
    assert project.ran(project.dvc("repro")) == STAGES
    assert project.report("preferences")["train/pairs_written"] > 0
    reward = project.report("reward")
    assert {"val/accuracy", "val/margin", "val/gold_spearman", "val/reward_mean", "perf/tokens_per_s"} <= set(reward)
    assert (project.path / "models/reward/reward_stats.json").exists()
    dpo = project.report("dpo")
    assert {"val/rewards/accuracies", "val/rewards/margins", "objective/kl", "perf/tokens_per_s"} <= set(dpo)

    client = MlflowClient(f"sqlite:///{project.path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("alignment").experiment_id])
    assert sorted(r.info.run_name for r in runs if r.data.tags["align.role"] == "stage") == sorted(STAGES)

    ppo = project.report("ppo")
    assert {"final/objective/gold_scores", "final/objective/kl", "start/objective/gold_scores"} <= set(ppo)

    project.set_param("reward", "lr", 0.002)
    out = project.dvc("repro")
    assert project.ran(out) == {"reward", "ppo"}  # ppo reads the reward model
    assert {"prepare", "sft", "preferences", "reference", "dpo"} <= project.skipped(out)

    project.set_param("ppo", "kl_coef", 0.1)
    out = project.dvc("repro")
    assert project.ran(out) == {"ppo"}

    # A beta sweep point reruns DPO only: the cached reference log-probs are reused.
    project.commit("baseline")
    exp = project.dvc("exp", "run", "-S", "dpo.beta=0.3")
    assert project.ran(exp) == {"dpo"}
    assert {"reference", "reward", "sft"} <= project.skipped(exp)
