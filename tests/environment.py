"""The environment the tests' processes start in, taken before the tests import any library.

Libraries set variables of their own when imported (scikit-learn's `KMP_DUPLICATE_LIB_OK`, MLflow's `SPARK_LOCAL_IP`,
Lightning's `PYTORCH_NVML_BASED_CUDA_CHECK`): a stage process a user starts from a shell has none of them, and a warm
server declines a process whose import-time variables differ from its own (stages/warm.py). So the stage processes
and the warm server the tests start get this snapshot, not the test process's environment of the moment.
"""

import os

from stages.warm import SOCKET_ENV  # the standard library only

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAUNCH = dict(os.environ)


def launch_environment(**extra: str) -> dict[str, str]:
    """`LAUNCH`, the warm server's socket when one runs, then `extra`."""
    socket = {SOCKET_ENV: os.environ[SOCKET_ENV]} if SOCKET_ENV in os.environ else {}
    return {**LAUNCH, **socket, **extra}
