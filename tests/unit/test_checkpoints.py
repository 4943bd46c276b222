"""The checkpoint folder is held by one process at a time: a second process running the same stage gets inert
checkpoints (no resume, no saves, nothing removed), and the hold ends with the holder, also when it is killed."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _callback(directory: Path, world_size: int, rank: int):
    from types import SimpleNamespace

    from pipeline.train.datamodule import RowsDataModule
    from pipeline.train.resume import ResumeCallback

    data = RowsDataModule(list(range(8)), [], collate=list, batch_size=2, seed=0)
    callback = ResumeCallback(Checkpoints(directory, every_n=4, keep=False), data)
    # The two attributes of Lightning's Trainer the restore reads: a real one of 2 processes needs two launched ranks.
    callback.setup(SimpleNamespace(world_size=world_size, global_rank=rank), None, "fit")
    return callback, data


def test_each_rank_resumes_with_its_own_random_state_and_the_shared_data_position(tmp_path):
    states = [{"torch": "rank 0's"}, {"torch": "rank 1's"}]
    callback, data = _callback(tmp_path, world_size=2, rank=1)
    callback.load_state_dict({"rng": states, "epoch": 1, "consumed": 3})
    assert callback._pending_rng == {"torch": "rank 1's"} and data._resume == (1, 3)


def test_a_checkpoint_of_two_processes_is_refused_by_one_naming_both_counts_and_the_folder(tmp_path):
    callback, data = _callback(tmp_path / "abc", world_size=1, rank=0)
    state = {"rng": [{"torch": "0"}, {"torch": "1"}], "epoch": 0, "consumed": 4}
    counts = r"written by 2 process\(es\) and this run has 1 \(trainer.devices x trainer.num_nodes\)"
    with pytest.raises(ValueError, match=counts + r".*Resume with 2 process\(es\), or delete .*abc"):
        callback.load_state_dict(state)
    assert data._resume is None  # nothing restored
