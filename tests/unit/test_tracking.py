from pathlib import Path

from pipeline.tracking import resolve_context


def test_store_is_anchored_at_dvc_root_and_group_from_exp_name(tmp_path):
    env = {"DVC_ROOT": str(tmp_path), "DVC_EXP_NAME": "amiss-nuke", "DVC_EXP_BASELINE_REV": "a" * 40}
    ctx = resolve_context(env, Path("/elsewhere"), "seed: 1\n")
    assert ctx.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert ctx.artifact_root == (tmp_path / "mlartifacts").as_uri()
    assert ctx.run_group == "amiss-nuke"
    assert ctx.git_sha == "a" * 40


def test_plain_repro_group_is_git_sha_and_params_hash(tmp_path):
    one = resolve_context({}, tmp_path, "seed: 1\n")
    two = resolve_context({}, tmp_path, "seed: 2\n")
    assert one.run_group.startswith("repro-nogit-") and one.run_group != two.run_group
    assert one.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_env_overrides_store_experiment_and_group(tmp_path):
    env = {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5055",
        "ALIGN_MLFLOW_EXPERIMENT": "x",
        "ALIGN_RUN_GROUP": "g",
    }
    ctx = resolve_context(env, tmp_path, "")
    assert (ctx.tracking_uri, ctx.experiment_name, ctx.run_group) == ("http://127.0.0.1:5055", "x", "g")
