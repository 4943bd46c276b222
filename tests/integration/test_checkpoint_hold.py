"""The checkpoint folder is held by one process at a time: a second process running the same stage gets inert
checkpoints (no resume, no saves, nothing removed), and the hold ends with the holder, also when it is killed."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from stages.checkpoints import Checkpoints
from tests.defaults import ROOT

HOLDER = """
import sys, time
from pathlib import Path
from stages.checkpoints import Checkpoints
with Checkpoints(Path(sys.argv[1]), every_n=5, keep=False).hold() as held:
    print("held" if held.every_n else "inert", flush=True)
    time.sleep(600)
"""


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_gets_inert_checkpoints_until_the_holder_dies(tmp_path):
    directory = tmp_path / ".checkpoints" / "reward" / "abc"
    directory.mkdir(parents=True)
    (directory / "step-000000005.ckpt").write_bytes(b"the holder's")
    checkpoints = Checkpoints(directory, every_n=5, keep=False)
    holder = _holder(directory)
    try:
        with checkpoints.hold() as held:
            assert (held.every_n, held.keep) == (0, True)
            held.clear()
        assert (directory / "step-000000005.ckpt").exists()  # the holder's files are untouched
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder: the kernel drops its lock
        holder.wait()
    time.sleep(0.1)
    with checkpoints.hold() as held:
        assert held == checkpoints
        held.clear()
    assert not directory.exists()
