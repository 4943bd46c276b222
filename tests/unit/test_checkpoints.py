"""The checkpointing callback restores each rank's random state and refuses a checkpoint of another process count."""

from pathlib import Path

import pytest

from stages.checkpoints import Checkpoints


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
