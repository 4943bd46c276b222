"""The project's commands beside the DAG (`python -m tools.<name>`, most behind a `make` target): the benchmark, the
GPU check, the frontier and plots pages, presets, the generated params reference and code deps, and the warm-start
server for stage processes. None is a DVC stage: `stages/` holds those."""
