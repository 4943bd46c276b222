"""Bad conversational input and a bad judge stop the `prepare` stage with a named error, and nothing is written.

The stage's entry point (`stages.prepare.main`, the function `python -m stages.prepare` runs) runs in the test's own
process, with the stage's argv, working directory and environment: each case fails within a second of work, where a
stage process would spend ~8 s importing torch, transformers and MLflow first. The tracking-server case runs the real
command in its own process: it is the one that shows a failed stage's exit status and stderr.
"""

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml

from tests.defaults import ROOT
from tests.environment import launch_environment
from tests.standins import chat_llama, sentiment_classifier, ultrafeedback_rows, write_jsonl


def _params(workdir: Path, **sections) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


def _prepare(workdir: Path, monkeypatch, **sections) -> str:
    """Run the prepare stage in this process, in `workdir`, as DVC would start it there; the traceback it fails
    with, as a stage process prints it to stderr (a stage that does not fail fails the test)."""
    from stages import prepare  # imported by the cases that run it, not when the suite is collected

    _params(workdir, **sections)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["python -m stages.prepare"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # for the processes it starts (the verifier's worker)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    environ = dict(os.environ)  # the stage sets its own variables (seed, run id): none outlives the case
    try:
        with pytest.raises(Exception) as failed:
            prepare.main()
    finally:
        os.environ.clear()
        os.environ.update(environ)
    return "".join(traceback.format_exception(failed.value))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {"model": chat_llama(root / "chat-llama"), "classifier": sentiment_classifier(root / "cls")}


def _chat_data(tmp_path, broken_row: dict | None) -> dict:
    rows = [{"messages": r["chosen"]} for r in ultrafeedback_rows(40)]
    if broken_row is not None:
        rows[5] = broken_row
    files = write_jsonl(tmp_path / "chat.jsonl", rows)
    return {
        "source": "dataset",
        "dataset_path": "json",
        "data_files": files,
        "messages_column": "messages",
        "n_val": 4,
        "n_test": 4,
    }


@pytest.mark.slow  # builds hub stand-ins and runs the stage
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}, "turn 0 has no 'role'"),
        ({"messages": [{"role": "critic", "content": "hi"}, {"role": "assistant", "content": "a"}]},
         "turn 0 has unknown role 'critic'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant turn"),
    ],
)  # fmt: skip
def test_bad_conversation_names_file_row_column_and_writes_nothing(tmp_path, monkeypatch, hub, row, message):
    error = _prepare(tmp_path, monkeypatch, model={"base": hub["model"]}, prepare=_chat_data(tmp_path, row))
    assert f"chat.jsonl column 'messages' row 5: {message}" in error
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow  # builds hub stand-ins and runs the stage
def test_classifier_label_it_does_not_have_names_the_key_and_writes_nothing(tmp_path, monkeypatch, hub):
    judge = {"kind": "classifier", "path": hub["classifier"], "label": "HAPPY"}
    error = _prepare(
        tmp_path, monkeypatch, model={"base": hub["model"]}, prepare=_chat_data(tmp_path, None), judge=judge
    )
    assert "judge.label: 'HAPPY' is not a label of classifier" in error
    assert "its labels are NEGATIVE, POSITIVE" in error
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


@pytest.mark.slow  # launches a stage process
def test_tracking_server_down_fails_before_any_work_naming_the_variable(tmp_path):
    _params(tmp_path)
    env = launch_environment(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    env.pop("DVC_ROOT", None)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    assert done.returncode != 0
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:9: the tracking server does not answer" in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()
    assert wall < 30, wall  # process start-up included; the MLflow client's own retries took 256 s


ROWS = [{"prompt": f"Q{i} is", "completion": f" answer {i}."} for i in range(30)]
GOOD_LINES = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD_LINES + b'{"prompt": "cut\n', "rows.jsonl line 31: not valid JSON"),
        (b"", "rows.jsonl: the file is empty"),
        (GOOD_LINES + '{"prompt": "caf\u00e9", "completion": " x"}\n'.encode("latin-1"),
         "rows.jsonl line 31: bytes b'\\xe9'"),
        (GOOD_LINES.replace(b'" answer 4."', b"null"), "column 'completion' (prepare.completion_column): 1 cell(s)"),
    ],
    ids=["malformed-json", "empty", "non-utf8", "null-text"],
)  # fmt: skip
def test_bad_data_file_names_the_file_and_line_and_writes_nothing(tmp_path, monkeypatch, content, message):
    (tmp_path / "rows.jsonl").write_bytes(content)
    data = {
        "source": "dataset",
        "dataset_path": "json",
        "data_files": str(tmp_path / "rows.jsonl"),
        "n_val": 2,
        "n_test": 2,
    }
    error = _prepare(tmp_path, monkeypatch, prepare=data)
    assert message in error, error[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
    assert not (tmp_path / "reports").exists()


GSM8K_LINES = [
    {"question": f"Tom has {i} apples and buys 2 more. How many now?",
     "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"}
    for i in range(30)
]  # fmt: skip
GSM8K = {
    "source": "dataset",
    "dataset_path": "json",
    "prompt_column": "question",
    "completion_column": "answer",
    "answer_column": "answer",
    "n_val": 2,
    "n_test": 2,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prepare", "judge", "message"),
    [
        ({"answer_column": "answer"}, {"verifier": "exact"},
         "column 'answer' (prepare.completion_column, prepare.answer_column): 1 cell(s) are not text: row 7 (nan)"),
        ({}, {"verifier": "python:no_such_module:check"},
         "judge.verifier: cannot import 'check' from module 'no_such_module'"),
        ({"answer_column": None}, {"verifier": "exact"},
         "prepare.answer_column: judge.kind 'verifier' checks responses against reference answers"),
    ],
    ids=["row-without-answer", "python-verifier-not-importable", "no-answer-column"],
)  # fmt: skip
def test_bad_verifier_input_names_the_key_or_row_and_writes_nothing(tmp_path, monkeypatch, prepare, judge, message):
    rows = [dict(row) for row in GSM8K_LINES]
    rows[7]["answer"] = None
    if "answer_column" not in prepare:  # the other cases have every answer
        rows[7]["answer"] = GSM8K_LINES[7]["answer"]
    data = {**GSM8K, "data_files": write_jsonl(tmp_path / "gsm8k.jsonl", rows), **prepare}
    error = _prepare(tmp_path, monkeypatch, prepare=data, judge={"kind": "verifier", **judge})
    assert message in error, error[-2000:]
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
    assert not (tmp_path / "reports").exists()
