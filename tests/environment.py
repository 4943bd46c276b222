"""The environment the tests' processes start in, taken before the tests import any library.

Libraries set variables of their own when imported (scikit-learn's `KMP_DUPLICATE_LIB_OK`, MLflow's `SPARK_LOCAL_IP`,
Lightning's `PYTORCH_NVML_BASED_CUDA_CHECK`): a stage process a user starts from a shell has none of them, and a warm
server declines a process whose import-time variables differ from its own (tools/warm.py). So the stage processes
and the warm server the tests start get this snapshot, not the test process's environment of the moment.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from tools.warm import SOCKET_ENV  # the standard library only

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist, each worker's torch and the processes its tests start (stages, DDP ranks, servers) get the
# worker's share of the cores for their intra-op threads (OpenMP, MKL), not every core: two workers on two cores
# otherwise run four busy threads that wait on each other: the whole suite took a third longer, a preset's DAG up to
# three times (docs/benchmarks.md). A run without workers keeps torch's default; a user's own setting always wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

LAUNCH = dict(os.environ)


def launch_environment(**extra: str) -> dict[str, str]:
    """`LAUNCH`, the warm server's socket when one runs, then `extra`."""
    socket = {SOCKET_ENV: os.environ[SOCKET_ENV]} if SOCKET_ENV in os.environ else {}
    return {**LAUNCH, **socket, **extra}


def start_warm_server(socket: Path, log: Path, cwd: Path, preload: tuple[str, ...] = (), timeout: float = 300):
    """`python -m tools.warm socket` (importing `preload`, or every stage's libraries) in `cwd`, with `LAUNCH` and
    its output in `log`; returns the process once it listens. One that ends or does not listen within `timeout`
    seconds is killed and fails the caller with its log."""
    command = [sys.executable, "-m", "tools.warm", str(socket), *(["--preload", *preload] if preload else [])]
    env = {key: value for key, value in LAUNCH.items() if key != SOCKET_ENV}
    with log.open("w") as out:
        server = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + timeout
    while "serving on" not in log.read_text():  # printed once it listens
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"the warm stage server did not start (exit {server.poll()}):\n{log.read_text()}")
        time.sleep(0.05)
    return server
