"""A copy of the project in a temporary git + DVC repo, with tiny params, driven through the real CLIs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tests.defaults import ROOT
from tests.environment import launch_environment

TINY = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128},
    "trainer": {"accelerator": "cpu", "log_every_n_steps": 2},
    "prepare": {"n_train": 300, "n_val": 32, "n_test": 16, "tokenizer_vocab_size": 1000},
    "sft": {"max_steps": 8, "val_every_n_steps": 4, "batch_size": 16, "warmup_steps": 2, "n_samples": 4},
    "preferences": {"k": 3, "train_prompts": 24, "val_prompts": 8, "max_new_tokens": 12, "batch_size": 64},
    "reward": {"max_steps": 4, "val_every_n_steps": 2, "batch_size": 8, "warmup_steps": 1},
    "reference": {"batch_size": 32},
    "dpo": {
        "max_steps": 4,
        "val_every_n_steps": 2,
        "batch_size": 8,
        "warmup_steps": 1,
        "kl_prompts": 8,
        "max_new_tokens": 12,
    },
    "ppo": {
        "rollouts": 2,
        "prompts_per_rollout": 8,
        "minibatch_size": 4,
        "max_new_tokens": 8,
        "min_eos_rate": 0.0,
        "warmup_rollouts": 1,
    },
    "evaluate": {"max_new_tokens": 12, "best_of_n": 4, "batch_size": 64, "n_shown_samples": 2},
    "monitor": {"prompts": 8},  # at the default cadence: measured before the first rollout and after the last
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test's own server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runs_module(cmdline: list[str], module: str) -> bool:
    """Whether a process's arguments run `python -m module` itself. Matched as arguments, not as a substring: DVC
    runs a stage's command through `$SHELL` or `/bin/sh`, and dash stays alive as the stage's parent with the whole
    command in one of its own arguments (`sh -c "python -m stages.x"`)."""
    return any(cmdline[i : i + 2] == ["-m", module] for i in range(len(cmdline) - 1))


def _environment() -> dict[str, str]:
    """The environment every command of a test project runs in: this venv first, offline, no outside store."""
    env = {
        **launch_environment(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # tiny stages last seconds
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    return env


class Project:
    """`preset` is applied with the documented command (`python -m tools.preset NAME`) before the tiny sizes and
    `overrides` (section -> keys, e.g. local stand-in paths), which win over both."""

    def __init__(self, path: Path, overrides: dict | None = None, preset: str | None = None) -> None:
        self.path = path
        for name in ("pipeline", "stages", "tools", "presets"):
            shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("dvc.yaml", ".gitignore", ".dvcignore", "params.yaml"):
            shutil.copy(ROOT / name, path / name)
        self.env = _environment()
        if preset is not None:
            self.run(sys.executable, "-m", "tools.preset", preset)
        params = yaml.safe_load((path / "params.yaml").read_text())
        for section, values in TINY.items():
            params[section].update(values)
        for section, values in (overrides or {}).items():
            params[section].update(values)
        (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        self.run("git", "init", "-q", "-b", "main")
        self.run("dvc", "init", "-q")
        self.run("dvc", "config", "core.analytics", "false")
        self.commit("project")

    @classmethod
    def at(cls, path: Path) -> Project:
        """A handle on a project already made at `path` (by another worker or fixture)."""
        project = cls.__new__(cls)
        project.path, project.env = path, _environment()
        return project

    @classmethod
    def copy_of(cls, source: Path, path: Path) -> Project:
        """A copy of the project at `source` (its git history, DVC cache, outputs and lock) with a fresh MLflow store:
        a test that starts from stages another run already reproduced, without running them again."""
        skip = shutil.ignore_patterns("mlflow.db", "mlartifacts", "tmp", ".checkpoints")
        shutil.copytree(source, path, symlinks=True, ignore=skip)
        return cls.at(path)

    def run(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        try:
            done = subprocess.run(
                args,
                cwd=self.path,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as error:
            raise AssertionError(
                f"{' '.join(args)} still running after {timeout:.0f} s:\n{error.stdout}\n{error.stderr}"
            ) from None
        if done.returncode and check:
            raise AssertionError(
                f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
            )
        return done.stdout + done.stderr

    def dvc(self, *args: str) -> str:
        return self.run(sys.executable, "-m", "dvc", *args)

    def run_queue(self, jobs: int, names: set[str], timeout: float = 900) -> str:
        """`dvc queue start -j jobs`, wait until nothing is queued or running, stop the workers; the final status.

        A point that ran commits its experiment under its name (a Git ref, read in milliseconds); one that failed
        commits none. So the queue's own status, 1.5-3 s of CPU that the queued stages need, is asked once every
        named point has its experiment, and every 30 s before that in case one failed.

        The workers are daemons that inherit `dvc queue start`'s output, so it goes to a file: a pipe would stay open
        (and this call blocked) for as long as they live. A queue still busy after `timeout` seconds fails the test
        with the status and the workers' logs, and its workers are killed."""
        log = self.path.parent / f"{self.path.name}-queue-start.log"
        with log.open("w") as out:
            subprocess.run(
                [sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)],
                cwd=self.path,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=True,
            )
        deadline, asked, status = time.monotonic() + timeout, time.monotonic(), ""
        while time.monotonic() < deadline:
            if names <= self.experiment_refs() or time.monotonic() - asked > 30:
                status, asked = self.dvc("queue", "status"), time.monotonic()
                if "Queued" not in status and "Running" not in status:
                    break
            time.sleep(1)
        else:
            logs = self.worker_logs()
            self.run(sys.executable, "-m", "dvc", "queue", "stop", "--kill", timeout=120, check=False)
            raise AssertionError(f"dvc queue still busy after {timeout:.0f} s:\n{status}\n{log.read_text()}\n{logs}")
        self.dvc("queue", "stop")
        return status

    def experiment_refs(self) -> set[str]:
        """The names of the experiments committed in this repository (`refs/exps/.../<name>`), read by Git alone."""
        refs = self.run("git", "for-each-ref", "--format=%(refname)", "refs/exps/")
        return {line.rsplit("/", 1)[-1] for line in refs.splitlines() if line.strip()}

    def worker_logs(self) -> str:
        """The tails of the DVC queue workers' own logs (where a task that failed in DVC's setup says why)."""
        workers = sorted((self.path / ".dvc/tmp/exps/celery").glob("*.out"))
        return "\n".join(f"== {path.name}\n{path.read_text()[-3000:]}" for path in workers)

    def failed_task_logs(self, status: str) -> str:
        """`dvc queue logs` of every task that `status` (a `dvc queue status` table) shows as failed."""
        failed = [line.split()[0] for line in status.splitlines() if line.split()[-1:] == ["Failed"]]
        # A task that failed in DVC's setup has no log: DVC says so and exits 255.
        logs = {
            task: self.run(sys.executable, "-m", "dvc", "queue", "logs", task, timeout=120, check=False)
            for task in failed
        }
        return "\n".join(f"== {task}\n{text[-8000:]}" for task, text in logs.items())

    def experiments(self, *remote: str) -> list[str]:
        """The names of every experiment `dvc exp list` shows, here or on `remote`."""
        listed = self.dvc("exp", "list", "--all-commits", "--name-only", *remote)
        return sorted(line.strip() for line in listed.splitlines() if line.strip())

    def run_points(self, points: dict[str, dict[str, str]], jobs: int, client: MlflowClient) -> list[str]:
        """Queue each named sweep point (its `-S key=value` overrides) and run them with `jobs` queue workers; the
        queue status of each round.

        DVC's queue has an open race with more than one worker (treeverse/dvc#10673: a task can fail in DVC's own
        setup, with no stage log). A point DVC lost that way is queued again and run alone, as a worker script would,
        up to three rounds. A stage of ours that fails (a FAILED MLflow run, a stage command that exited non-zero)
        fails the test at once."""
        todo, rounds = list(points), []
        for attempt in range(3):
            for name in todo:
                overrides = [arg for key, value in points[name].items() for arg in ("-S", f"{key}={value}")]
                self.dvc("exp", "run", "--queue", *overrides, "-n", name)
            status = self.run_queue(jobs if attempt == 0 else 1, set(todo))
            logs = self.failed_task_logs(status)
            experiment = client.get_experiment_by_name("alignment")
            runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
            failed = [
                r.info.run_name
                for r in runs
                if r.data.tags.get("align.run_group") in points and r.info.status == "FAILED"
            ]
            assert not failed and "failed to run:" not in logs, f"a stage failed: {failed}\n{status}\n{logs}"
            rounds.append(f"round {attempt + 1} (-j {jobs if attempt == 0 else 1}):\n{status}\n{logs}")
            todo = sorted(set(points) - set(self.experiments()))
            if not todo:
                break
            self.dvc("queue", "remove", "--failed")
        assert not todo, f"DVC lost {todo} in every round:\n" + "\n".join(rounds) + "\n" + self.worker_logs()
        return rounds

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)

    def set_param(self, section: str, key: str, value) -> None:
        params = yaml.safe_load((self.path / "params.yaml").read_text())
        params[section][key] = value
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def report(self, stage: str) -> dict:
        return json.loads((self.path / "reports" / f"{stage}.json").read_text())

    def lock(self) -> dict:
        return yaml.safe_load((self.path / "dvc.lock").read_text())["stages"]

    @staticmethod
    def ran(output: str) -> set[str]:
        return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}

    @staticmethod
    def skipped(output: str) -> set[str]:
        return {
            line.split("'")[1]
            for line in output.splitlines()
            if line.startswith("Stage '") and ("didn't change" in line or "is cached" in line)
        }
