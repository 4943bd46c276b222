"""Warm stage starts: a server that has imported the stages' libraries once, and forks a stage process from itself.

A stage process spends 7-10 s importing torch, transformers, Lightning and MLflow before its first line of work
(`python -X importtime -c "import stages.dpo"`; docs/benchmarks.md), longer than a tiny stage's work. Start a server,
point `STAGES_WARM_SOCKET` at it, and every `python -m stages.<stage>` that DVC (or anyone) launches hands its
request to the server, which forks a child that runs the stage:

    python -m tools.warm /tmp/stages.sock &      # imports everything once (~10 s), then serves
    export STAGES_WARM_SOCKET=/tmp/stages.sock
    dvc repro                                     # each stage starts in ~0.1 s

The child is the stage process in all that a stage sees: the caller's working directory, environment, argv,
`sys.path`, stdin/stdout/stderr (passed over the socket) and stdout/stderr buffering; `pipeline` and `stages` are
imported fresh from the caller's `sys.path`, only third-party modules come from the server. The caller (the
"client", the process DVC started) waits for it and exits with its status or its signal; signals sent to the client
are passed on, and a client that is killed takes the child with it. Where anything read while importing could
differ (interpreter, flags, the environment variables of the hub, torch, threading libraries, hash seed or ranks:
`IMPORT_TIME_ENV`), the server declines and the client starts the ordinary, cold way. No server, no socket, or a
server that declines: the stage starts cold, as it always did. The tests run their stage processes this way
(tests/conftest.py), except those that test killing a stage.

What differs from a cold process: `ru_maxrss` (the `perf/peak_rss_mb` metric) counts the modules the server
loaded for all stages, and `os.getppid()` is the server.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import threading
import traceback
import types

from stages import dag_stages, interpreter_exit

SOCKET_ENV = "STAGES_WARM_SOCKET"
STAGES = dag_stages()
"""The DVC stages' entry points, the processes a warm start serves (not the bench's, which measure a process)."""
PRELOAD = (*(f"stages.{name}" for name in STAGES), "mlflow.store.tracking.sqlalchemy_store")
"""What the server imports before it serves: every stage module (for their libraries; `pipeline` and `stages`
themselves are dropped again) and MLflow's SQL store, which a stage imports when it opens its run (~1.6 s)."""
IMPORT_TIME_ENV = (
    "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH_", "CUDA_", "NCCL_", "GLOO_", "OMP_",
    "MKL_", "OPENBLAS_", "KMP_", "LD_", "MALLOC_", "PYTHONHASHSEED", "PYTHONWARNINGS", "RANK", "LOCAL_RANK",
    "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "SLURM_", "JSM_NAMESPACE_", "TORCHELASTIC_", "PL_", "LIGHTNING_",
)  # fmt: skip
"""Environment variables read while a library is imported (offline mode, thread pools, the rank Lightning's
`rank_zero_only` fixes at import, ...): a warm start needs them equal in the client and the server."""
_HEADER = struct.Struct("!I")


def _interpreter() -> dict:
    """What this interpreter was started with, that imports can read."""
    return {
        "executable": sys.executable,
        "version": sys.version,
        "flags": list(sys.flags),
        "warnoptions": sys.warnoptions,
        "xoptions": {key: str(value) for key, value in sys._xoptions.items()},
    }


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_ENV)}


# The client: the process DVC starts, `python -m stages.<stage>`, from `stages/__init__.py`.


def hand_over() -> None:
    """Run this `python -m stages.<stage>` in a warm server's child and exit with its status; return (and let the
    stage start cold) when no server is set or reachable, or it declines."""
    path = os.environ.get(SOCKET_ENV)
    command = sys.orig_argv[1:3]
    if not path or len(command) < 2 or command[0] != "-m" or command[1].removeprefix("stages.") not in STAGES:
        return
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        request = {
            "module": command[1],
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "path": sys.path,
            "streams": [_buffering(stream) for stream in (sys.stdout, sys.stderr)],
            "interpreter": _interpreter(),
        }
        payload = json.dumps(request).encode()
        socket.send_fds(client, [_HEADER.pack(len(payload))], [0, 1, 2])
        client.sendall(payload)
        replies = client.makefile("r")
        reply = json.loads(replies.readline() or '{"declined": "no answer"}')
    except OSError:  # no server yet (or any more): start cold
        client.close()
        return
    if "pid" not in reply:
        client.close()
        return
    child = reply["pid"]
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, lambda number, _frame: os.kill(child, number))
    line = replies.readline()
    if not line:
        sys.stderr.write(f"tools.warm: the server at {path} went away before stage process {child} ended\n")
        os._exit(1)
    status = json.loads(line)["status"]
    if status < 0:  # ended by a signal: end by the same one, as a cold stage would
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status if status >= 0 else 1)


def _buffering(stream) -> dict:
    return {"line_buffering": stream.line_buffering, "write_through": stream.write_through}


# The server.


def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> None:
    """Import `preload`, then fork a child for each client on the Unix socket `path` until SIGTERM/SIGINT (or the
    process that started the server ends)."""
    before = dict(os.environ)
    for name in preload:
        importlib.import_module(name)
    for name in [name for name in sys.modules if name.split(".")[0] in ("pipeline", "stages")]:
        del sys.modules[name]  # a child imports them from its own working copy
    state = {
        "interpreter": _interpreter(),
        "env": _import_time_env(before),
        # Lightning's PYTORCH_NVML_BASED_CUDA_CHECK, MLflow's SPARK_LOCAL_IP, ...: a cold stage process sets them
        # while it imports, so a child sets them where its client has not.
        "set_by_imports": {key: value for key, value in os.environ.items() if before.get(key) != value},
    }
    parent = os.getppid()
    if os.path.exists(path):  # left by a server that was killed
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(64)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop through the pipe
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        waiting: dict[int, socket.socket] = {}  # child pid -> its client's connection
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        print(f"tools.warm: serving on {path} (export {SOCKET_ENV}={path})", flush=True)
        try:
            while os.getppid() == parent:
                for key, _ in selector.select(timeout=1.0):
                    if key.fileobj is listener:
                        connection, _ = listener.accept()
                        _serve_one(connection, state, waiting, closing=(listener.fileno(), wake_read, wake_write))
                    else:
                        os.read(wake_read, 4096)
                _reap(waiting)
        finally:
            os.unlink(path)


def _serve_one(connection: socket.socket, state: dict, waiting: dict[int, socket.socket], closing: tuple) -> None:
    connection.settimeout(10)
    fds: list[int] = []
    try:
        header, fds, _, _ = socket.recv_fds(connection, _HEADER.size, 3)
        (size,) = _HEADER.unpack(header)
        payload = b""
        while len(payload) < size:
            payload += connection.recv(size - len(payload)) or _eof()
        request = json.loads(payload)
    except (OSError, ValueError, struct.error):  # a client that died or sent garbage: nothing to serve
        for fd in fds:
            os.close(fd)
        connection.close()
        return
    declined = _differences(request, state)
    if len(fds) != 3 or declined:
        declined = declined or ["stdin, stdout and stderr not passed"]
        print(f"tools.warm: {request['module']} in {request['cwd']} starts cold: {'; '.join(declined)}", flush=True)
        _send(connection, {"declined": declined})
        for fd in fds:
            os.close(fd)
        connection.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:  # never back into the server's loop
            for fd in closing:
                os.close(fd)
            for other in waiting.values():
                other.close()
            _run_child(connection, fds, request, state["set_by_imports"])
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    _send(connection, {"pid": pid})
    waiting[pid] = connection
    print(f"tools.warm: {request['module']} in {request['cwd']}: process {pid}", flush=True)


def _differences(request: dict, state: dict) -> list[str]:
    """What the client would have read at import differently from the server, as `key: client's != server's`."""
    theirs = request.get("interpreter", {})
    differences = [
        f"{key}: {theirs.get(key)!r} != {ours!r}"
        for key, ours in state["interpreter"].items()
        if theirs.get(key) != ours
    ]
    client, server = _import_time_env(request.get("env", {})), state["env"]
    differences += [
        f"${key}: {client.get(key)!r} != {server.get(key)!r}"
        for key in sorted({*client, *server})
        if client.get(key) != server.get(key)
    ]
    return differences


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = waiting.pop(pid, None)
        if connection is not None:
            _send(connection, {"status": os.waitstatus_to_exitcode(status)})
            connection.close()


def _send(connection: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):  # the client is gone; its child (if any) has seen it and ends
        connection.sendall((json.dumps(message) + "\n").encode())


def _eof() -> bytes:
    raise OSError("the client closed the connection mid-request")


# The child: becomes the client's stage process.


def _run_child(connection: socket.socket, fds: list[int], request: dict, set_by_imports: dict[str, str]) -> None:
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for stream, buffering in zip((sys.stdout, sys.stderr), request["streams"], strict=True):
        stream.reconfigure(**buffering)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in set_by_imports.items():
        os.environ.setdefault(key, value)
    sys.path[:] = request["path"]
    sys.argv[:] = request["argv"]
    importlib.invalidate_caches()
    sys.modules["__main__"] = types.ModuleType("__main__")  # the stage runs as `__main__`, as under `-m`
    threading.Thread(target=_die_with_client, args=(connection,), daemon=True).start()
    os._exit(_run_stage(request["module"]))


def _die_with_client(connection: socket.socket) -> None:
    """The client only closes its end when it ends: killed (kill -9 on the stage process DVC started) it takes its
    stage with it, as the stage itself would have been."""
    connection.settimeout(None)
    with contextlib.suppress(OSError):
        while connection.recv(64):
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _run_stage(module: str) -> int:
    """`python -m module`'s run and exit: the exit status, after what the interpreter does at exit."""
    signalled = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)  # as `python -m`: `__main__`, argv[0] set
        status = 0
    except SystemExit as exit:
        status = _exit_status(exit.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        status, signalled = 1, signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    interpreter_exit()
    if signalled:  # as CPython ends after an uncaught KeyboardInterrupt
        signal.signal(signalled, signal.SIG_DFL)
        os.kill(os.getpid(), signalled)
    return status


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("socket", help="the Unix socket to serve on (then: export STAGES_WARM_SOCKET=<socket>)")
    parser.add_argument("--preload", nargs="+", default=list(PRELOAD), help="modules imported before serving")
    arguments = parser.parse_args()
    serve(arguments.socket, tuple(arguments.preload))
