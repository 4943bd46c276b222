"""Runs several end-to-end tests start from: made once per test session (once per xdist worker that needs it)."""

import pytest

from tests.e2e.project import Project

UPSTREAM = ("reward", "reference")
"""The tiny DAG's stages up to these (prepare, sft, preferences, reward, reference): what DPO and PPO train from."""


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Project:
    """The tiny project with every stage DPO and PPO read reproduced. Copy it (`Project.copy_of`), never change it."""
    project = Project(tmp_path_factory.mktemp("upstream") / "repo")
    project.dvc("repro", *UPSTREAM)
    project.commit("upstream reproduced")
    return project
