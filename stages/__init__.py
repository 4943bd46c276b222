"""The DVC stages' entry points (`python -m stages.<stage>`), one module per stage of dvc.yaml, and their runtime
(`common`, `checkpoints`, `reaper`). The commands beside the DAG live in `tools/`.

With `STAGES_WARM_SOCKET` set, a stage's process hands itself to a warm server before it imports anything heavy
(tools/warm.py). The server and its children were started otherwise (`sys.orig_argv` is the server's own
`python -m tools.warm ...`), so only a process started as a stage hands itself over. This file imports only the
standard library: it runs first in every stage process.
"""

import atexit
import os
import re
import sys
import threading
from pathlib import Path

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"


def dag_stages(dvc_yaml: Path = DVC_YAML) -> tuple[str, ...]:
    """The names of the DAG's stages, in `dvc.yaml`'s order (read without a YAML parser: this file imports only the
    standard library; `dvc.yaml` lists each stage as a two-space-indented key under `stages:`)."""
    block = re.search(r"^stages:\n(.*?)(?=^\S|\Z)", dvc_yaml.read_text(), flags=re.MULTILINE | re.DOTALL)
    return tuple(re.findall(r"^  ([A-Za-z_][\w-]*):\s*$", block.group(1), flags=re.MULTILINE)) if block else ()


def interpreter_exit() -> None:
    """What the interpreter does at exit, before it tears its modules down: join the non-daemon threads, run the
    `atexit` handlers, flush stdout and stderr. Shared by a stage's own exit (`stages.common.run_main`) and a warm
    server's child (tools/warm.py). `atexit._run_exitfuncs` is private (CPython since 3.0): no public function runs
    the handlers without exiting."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


if os.environ.get("STAGES_WARM_SOCKET") and sys.orig_argv[1:2] == ["-m"] and sys.orig_argv[2:3] != ["tools.warm"]:
    from tools.warm import hand_over

    hand_over()
