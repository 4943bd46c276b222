"""`stages.common.run_main`: a stage that returned leaves through `os._exit`, after the interpreter's own exit steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.defaults import ROOT

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from stages.common import run_main

out = Path(sys.argv[1])


def main():
    def late():  # a non-daemon thread still working when main returns: the interpreter would wait for it
        time.sleep(0.5)
        (out / "thread").write_text("done")

    threading.Thread(target=late).start()
    # atexit runs after the threads are joined, as at a normal exit: it sees the thread's file
    atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
    sys.stdout.write("no newline, still buffered")
    if sys.argv[2] == "raise":
        raise ValueError("a stage that fails")


if __name__ == "__main__":
    run_main(main)
"""


def _run(tmp_path: Path, how: str) -> subprocess.CompletedProcess:
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), how],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_a_stage_that_returns_joins_its_threads_runs_atexit_and_flushes_before_it_exits_0(tmp_path):
    done = _run(tmp_path, "return")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no newline, still buffered"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "True"


def test_a_stage_that_raises_exits_the_normal_way_with_its_traceback_and_status_1(tmp_path):
    done = _run(tmp_path, "raise")
    assert done.returncode == 1
    assert "ValueError: a stage that fails" in done.stderr
    assert done.stdout == "no newline, still buffered"
    assert (tmp_path / "atexit").read_text() == "True"
