from pathlib import Path

from pipeline.track.tracking import resolve_context


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


def test_unreachable_tracking_server_fails_fast_naming_the_variable(tracking):
    import dataclasses
    import time

    import pytest

    from pipeline.track.tracking import StageRun, TrackingUnavailable

    down = dataclasses.replace(tracking, tracking_uri="http://127.0.0.1:9")  # nothing listens on port 9
    start = time.perf_counter()
    with pytest.raises(
        TrackingUnavailable,
        match=r"MLFLOW_TRACKING_URI=http://127\.0\.0\.1:9: the tracking server "
        r"does not answer .*unset MLFLOW_TRACKING_URI",
    ):
        StageRun(down, "prepare", {}, {}).__enter__()
    assert time.perf_counter() - start < 10


def test_runs_left_running_by_a_killed_stage_are_marked_killed(tracking):
    from mlflow.tracking import MlflowClient

    from pipeline.track.tracking import GROUP_TAG, STAGE_TAG, StageRun

    with StageRun(tracking, "sft", {}, {}) as first:
        pass
    client = MlflowClient(tracking.tracking_uri)
    experiment = client.get_experiment_by_name(tracking.experiment_name).experiment_id
    zombie = client.create_run(experiment, tags={GROUP_TAG: tracking.run_group, STAGE_TAG: "sft"}).info.run_id
    other = client.create_run(experiment, tags={GROUP_TAG: tracking.run_group, STAGE_TAG: "dpo"}).info.run_id
    with StageRun(tracking, "sft", {}, {}) as second:
        assert second.killed == [zombie]
    assert client.get_run(zombie).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"  # another stage's run is not this stage's business
    assert client.get_run(first.run_id).info.status == client.get_run(second.run_id).info.status == "FINISHED"


def test_long_param_values_are_cut_with_a_marker_not_rejected(tracking):
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from pipeline.track.tracking import TRUNCATED, StageRun

    template = "{% for message in messages %}" * 400  # a chat template, ~12,000 characters
    with StageRun(tracking, "sft", {"model.chat_template": template, "sft.lr": 0.001}, {}) as run:
        pass
    params = MlflowClient(tracking.tracking_uri).get_run(run.run_id).data.params
    assert len(params["model.chat_template"]) == MAX_PARAM_VAL_LENGTH
    assert params["model.chat_template"] == template[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
    assert params["sft.lr"] == "0.001"


def test_stage_run_carries_source_tags_extra_tags_and_input_tables(tracking):
    from mlflow.tracking import MlflowClient

    from pipeline.track.tracking import StageRun, TableInput

    table = TableInput(
        name="prepared/train",
        digest="0123456789abcdef0123456789abcdef",
        source="data/t.parquet",
        columns={"prompt": "string"},
        num_rows=3,
        context="training",
    )
    with StageRun(tracking, "sft", {}, {}, tags={"sys.threads": "2"}) as run:
        run.log_tables([table])
    logged = MlflowClient(tracking.tracking_uri).get_run(run.run_id)
    assert logged.data.tags["mlflow.source.name"] == "stages/sft.py"
    assert logged.data.tags["mlflow.source.git.commit"] == "0" * 40 and logged.data.tags["sys.threads"] == "2"
    (dataset,) = logged.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("prepared/train", "0123456789abcdef0123456789abcdef")


def test_experiment_opens_on_training_runs_and_the_parent_run_spans_its_stages(tracking):
    import time

    import pytest
    from mlflow.tracking import MlflowClient

    from pipeline.track.tracking import StageRun, TableInput

    table = TableInput(
        name="prepared/train",
        digest="0" * 32,
        source="data/t.parquet",
        columns={"prompt": "string"},
        num_rows=3,
        context="training",
    )
    with StageRun(tracking, "prepare", {}, {"seed": 1}) as first:
        time.sleep(0.3)
    client = MlflowClient(tracking.tracking_uri)
    experiment = client.get_experiment_by_name(tracking.experiment_name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI overview
    assert "tags.align.role = 'group'" in experiment.tags["mlflow.note.content"]
    with pytest.raises(RuntimeError), StageRun(tracking, "sft", {}, {"seed": 1}) as second:
        assert client.get_run(second.parent_run_id).info.status == "RUNNING"
        second.log_tables([table])
        time.sleep(0.3)
        raise RuntimeError("sampling failed")
    parent = client.get_run(first.parent_run_id)
    assert second.parent_run_id == first.parent_run_id and parent.info.status == "FAILED"
    stages = [client.get_run(run.run_id).info for run in (first, second)]
    assert parent.info.start_time <= stages[0].start_time and parent.info.end_time >= stages[1].end_time
    assert parent.info.end_time - parent.info.start_time >= 600  # the two stages' span, not a created-finished 0 ms
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["prepared/train"]
    with StageRun(tracking, "sft", {}, {"seed": 1}):  # the stage rerun succeeds: so does the pipeline run
        pass
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"


def test_a_server_that_stops_answering_is_told_apart_from_a_request_it_rejected(tracking, monkeypatch):
    import pytest
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.track.tracking import lost_server_message, server_lost

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as gone:  # nothing listens on port 9
        MlflowClient("http://127.0.0.1:9").get_run("0" * 32)
    with pytest.raises(MlflowException) as rejected:  # the store answered: no such run
        MlflowClient(tracking.tracking_uri).get_run("0" * 32)
    assert server_lost(gone.value) and not server_lost(rejected.value) and not server_lost(ValueError("x"))
    message = lost_server_message("http://127.0.0.1:9", gone.value)
    assert message.startswith("MLFLOW_TRACKING_URI=http://127.0.0.1:9: the tracking server stopped answering while")
    assert "/runs/get" in message and "\n" not in message


def test_the_reaper_marks_the_runs_of_a_stage_that_died_and_leaves_those_it_ended(tracking):
    from mlflow.tracking import MlflowClient

    from pipeline.track.tracking import mark_orphaned
    from stages.reaper import watch

    assert watch(["run a b\n", "closed\n"]) == [] and watch([]) == []  # ended by the stage; nothing opened
    assert watch(["run a b\n"]) == ["a", "b"]  # its pipe closed without `closed`: the stage died
    client = MlflowClient(tracking.tracking_uri)
    experiment = client.create_experiment("reaper")
    running, ended = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(ended, "FINISHED")
    assert mark_orphaned(client, [running, ended, "0" * 32]) == [running]
    assert [client.get_run(r).info.status for r in (running, ended)] == ["KILLED", "FINISHED"]
