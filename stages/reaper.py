"""`python -m stages.reaper TRACKING_URI`: marks a stage's MLflow runs KILLED when its process dies without ending them.

A stage killed with SIGKILL (or by the OOM killer, or a preempted node) cannot end its own run: the run and its pipeline
run would show RUNNING for good when nothing of ours runs again in that pipeline run, as when `dvc repro` restores the
stage from DVC's run-cache instead of running it. So rank 0 of every stage starts this watcher (`stages.common`), in a
session of its own (a kill of the stage's process group leaves it), with a pipe on its standard input: the stage
writes `run RUN_ID PARENT_ID` once its run is open and `closed` once it has ended it (FINISHED or FAILED). Standard
input ending without `closed` means the stage died: its runs still RUNNING are marked KILLED. Until then it imports
nothing but the standard library and sleeps in one blocking read; a stage that ends normally costs one short process.

A stage resumed from a checkpoint sets its KILLED run RUNNING again and continues it (`StageRun`).
"""

from __future__ import annotations

import sys


def watch(lines) -> list[str]:
    """Read the stage's messages until its end; the ids of the runs to mark KILLED (none when it closed them)."""
    runs: list[str] = []
    for line in lines:
        words = line.split()
        if words[:1] == ["run"]:
            runs = words[1:]
        elif words[:1] == ["closed"]:
            return []
    return runs


def main() -> None:
    uri = sys.argv[1]
    runs = watch(sys.stdin)
    if runs:
        from pipeline.track.tracking import mark_orphaned, open_store

        marked = mark_orphaned(open_store(uri), runs)
        print(f"stages.reaper: the stage died; marked {', '.join(marked) or 'no run'} KILLED", file=sys.stderr)


if __name__ == "__main__":
    main()
