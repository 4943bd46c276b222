"""Report command (not a DVC stage): the reward-KL frontier over every finished pipeline run in MLflow.

Run after a sweep (`make frontier`, or `python -m stages.frontier`): it reads the MLflow store the stages wrote
(`MLFLOW_TRACKING_URI` or `<repo>/mlflow.db`) and writes reports/frontier.png and reports/frontier.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.frontier import aggregate, frontier_markdown, frontier_points, plot_frontier
from pipeline.io import write_text
from pipeline.tracking import pipeline_runs, resolve_context


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.frontier", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", default="reports/frontier.md")
    parser.add_argument("--plot", default="reports/frontier.png")
    args = parser.parse_args()
    ctx = resolve_context(os.environ, Path.cwd(), "")
    runs = pipeline_runs(ctx.tracking_uri, ctx.experiment_name)
    if not runs:
        sys.exit(f"frontier: no finished pipeline runs in {ctx.tracking_uri} (experiment {ctx.experiment_name!r}); "
                 "run `dvc repro` or a sweep first")  # fmt: skip
    table = aggregate(frontier_points(runs))
    write_text(frontier_markdown(table), args.markdown)
    plot_frontier(table, args.plot)
    print(frontier_markdown(table))
    print(f"frontier: {len(runs)} pipeline runs -> {args.markdown}, {args.plot}")


if __name__ == "__main__":
    main()
