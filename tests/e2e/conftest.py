"""Runs several end-to-end tests start from, made once per test run: under pytest-xdist, the first worker that needs
one builds it while the others wait on a file lock (pytest-xdist's recipe for session fixtures run once)."""

from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from tests.e2e.project import Project

UPSTREAM = ("reward", "reference")
"""The tiny DAG's stages up to these (prepare, sft, preferences, reward, reference): what DPO and PPO train from."""


def run_root(tmp_path_factory, worker_id: str) -> Path:
    """The folder of this test run that every worker's base temp sits in (the base temp itself without xdist)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if worker_id != "master" else root


def built_once(tmp_path_factory, worker_id: str, name: str, build: Callable[[Path], None]) -> Path:
    """`<run's temp root>/<name>`, filled by `build(path)` the first time any worker asks for it in this run."""
    root = run_root(tmp_path_factory, worker_id)
    path = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            path.mkdir()
            build(path)
            (root / f"{name}.done").touch()
    return path


@pytest.fixture(scope="session")
def upstream(tmp_path_factory, worker_id) -> Project:
    """The tiny project with every stage DPO and PPO read reproduced by one `dvc repro` (its output in
    `upstream.path.parent / "repro.txt"`). Copy it (`Project.copy_of`), never change it."""

    def build(path: Path) -> None:
        project = Project(path / "repo")
        (path / "repro.txt").write_text(project.dvc("repro", *UPSTREAM))
        project.commit("upstream reproduced")

    return Project.at(built_once(tmp_path_factory, worker_id, "upstream", build) / "repo")
