"""Warm stage starts (tools/warm.py): `python -m stages.prepare` run as a fork of a server, with the caller's
directory, argv, environment, streams, exit status and signals, and the code of the caller's copy; cold where the
server is absent or the environment read at import differs. The stage here is a stand-in that reports what it sees
(the real stages run warm in every end-to-end test, tests/conftest.py); and the hand-over imports nothing heavy."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.defaults import ROOT
from tests.environment import LAUNCH, start_warm_server
from tools.warm import SOCKET_ENV

STAND_IN = """
import json, os, sys, time
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv, "file": __file__,
                  "name": __name__, "copy": COPY, "value": os.environ.get("STAND_IN_VALUE")}), flush=True)
print("to stderr", file=sys.stderr)
mode = os.environ.get("STAND_IN_MODE")
if mode == "exit":
    sys.exit(3)
if mode == "raise":
    raise RuntimeError("the stand-in failed")
if mode == "sleep":
    time.sleep(120)
"""


def _project(path: Path, copy: str) -> Path:
    for name in ("stages/__init__.py", "tools/__init__.py", "tools/warm.py"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, path / name)
    (path / "stages" / "prepare.py").write_text(f"COPY = {copy!r}\n{STAND_IN}")
    (path / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: python -m stages.prepare\n")  # the DAG it serves
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server started in one copy of the project (preloading only `json`), its socket and its log."""
    root = tmp_path_factory.mktemp("warm")
    served = _project(root / "served", "served")
    log = root / "server.log"
    process = start_warm_server(root / "s.sock", log, cwd=served, preload=("json",), timeout=60)
    yield process, root / "s.sock", log
    process.terminate()
    assert process.wait(timeout=30) == 0
    assert not (root / "s.sock").exists()  # the server removes its socket


def _stage(cwd: Path, socket: Path | None, **env: str) -> subprocess.Popen:
    environment = {key: value for key, value in LAUNCH.items() if key != SOCKET_ENV} | env
    if socket is not None:
        environment[SOCKET_ENV] = str(socket)
    return subprocess.Popen(
        [sys.executable, "-m", "stages.prepare", "--data-dir", "x y"],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _seen(process: subprocess.Popen) -> dict:
    return json.loads(process.stdout.readline())


def test_a_warm_stage_is_the_servers_child_with_the_callers_world(server, tmp_path):
    process, socket, log = server
    caller = _project(tmp_path / "caller", "caller's")  # another copy of the project: its code runs, not the server's
    stage = _stage(caller, socket, STAND_IN_VALUE="from the caller")
    out, err = stage.communicate(timeout=60)
    seen = json.loads(out)
    assert stage.returncode == 0
    assert seen["ppid"] == process.pid  # forked by the server, not started by the caller
    assert seen["copy"] == "caller's" and seen["file"] == str(caller / "stages" / "prepare.py")
    assert seen["cwd"] == str(caller) and seen["name"] == "__main__"
    assert seen["argv"] == [str(caller / "stages" / "prepare.py"), "--data-dir", "x y"]
    assert seen["value"] == "from the caller"
    assert err == "to stderr\n"
    assert f"stages.prepare in {caller}: process {seen['pid']}" in log.read_text()


@pytest.mark.parametrize(("mode", "status", "stderr"), [("exit", 3, ""), ("raise", 1, "RuntimeError: the stand-in")])
def test_a_warm_stage_exits_with_its_own_status_and_traceback(server, tmp_path, mode, status, stderr):
    _, socket, _ = server
    stage = _stage(_project(tmp_path / "caller", "caller's"), socket, STAND_IN_MODE=mode)
    out, err = stage.communicate(timeout=60)
    assert stage.returncode == status
    assert json.loads(out)["ppid"] != stage.pid  # it ran warm
    assert stderr in err and err.startswith("to stderr\n")


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)  # the server reaps its children: a dead one does not linger as a zombie
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_a_signal_to_the_caller_reaches_the_warm_stage(server, tmp_path):
    _, socket, _ = server
    stage = _stage(_project(tmp_path / "caller", "caller's"), socket, STAND_IN_MODE="sleep")
    child = _seen(stage)["pid"]
    assert child != stage.pid
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=30) == -signal.SIGTERM  # it ends by the signal its stage ended by
    assert _gone(child)


def test_a_killed_caller_takes_its_warm_stage_with_it(server, tmp_path):
    _, socket, _ = server
    stage = _stage(_project(tmp_path / "caller", "caller's"), socket, STAND_IN_MODE="sleep")
    child = _seen(stage)["pid"]
    stage.kill()  # kill -9 on the process DVC started, as a user's or a test's
    stage.wait(timeout=30)
    assert _gone(child)


def test_a_stage_starts_cold_where_an_import_time_variable_differs(server, tmp_path):
    _, socket, log = server
    caller = _project(tmp_path / "caller", "caller's")
    stage = _stage(caller, socket, OMP_NUM_THREADS="3")
    out, _ = stage.communicate(timeout=60)
    assert stage.returncode == 0 and json.loads(out)["pid"] == stage.pid  # the caller ran it itself
    server_value = LAUNCH.get("OMP_NUM_THREADS")  # the server's: 1 under two pytest-xdist workers on two cores
    assert f"stages.prepare in {caller} starts cold: $OMP_NUM_THREADS: '3' != {server_value!r}" in log.read_text()


def test_a_stage_starts_cold_without_a_server(tmp_path):
    stage = _stage(_project(tmp_path / "caller", "caller's"), tmp_path / "no-server.sock", STAND_IN_MODE="exit")
    out, err = stage.communicate(timeout=60)
    assert stage.returncode == 3 and json.loads(out)["pid"] == stage.pid and err == "to stderr\n"


def test_the_hand_over_imports_only_the_standard_library():
    """It runs in every stage process before anything else: a library imported here would be loaded cold again."""
    from tools.deps import imports

    for path in (ROOT / "stages" / "__init__.py", ROOT / "tools" / "warm.py"):
        outside = {name for name in imports(path) if name.split(".")[0] not in sys.stdlib_module_names}
        assert outside <= {"tools.warm", "stages"}, (path.name, outside)
