"""Report command (not a DVC stage): the reward-KL frontier over every finished pipeline run in MLflow.

Run after a sweep (`make frontier`, or `python -m tools.frontier`): it reads the MLflow store the stages wrote
(`MLFLOW_TRACKING_URI` or `<repo>/mlflow.db`) and writes reports/frontier.png, reports/frontier.md and the
headline table over seeds, reports/seeds.md. `--group-prefix sweep-` keeps only the runs of one sweep (its
`dvc exp run -n` names).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.eval.frontier import (
    aggregate,
    frontier_markdown,
    frontier_points,
    plot_frontier,
    seed_summary,
    seeds_markdown,
)
from pipeline.files import write_text
from pipeline.track.tracking import pipeline_runs, resolve_context


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.frontier", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", default="reports/frontier.md")
    parser.add_argument("--plot", default="reports/frontier.png")
    parser.add_argument("--points", default="reports/plots/frontier.csv", help="the averaged points, for dvc plots")
    parser.add_argument("--seeds", default="reports/seeds.md", help="the headline table over seeds")
    parser.add_argument("--group-prefix", default="", help="only pipeline runs whose name starts with this")
    args = parser.parse_args()
    ctx = resolve_context(os.environ, Path.cwd(), "")
    runs = [
        run
        for run in pipeline_runs(ctx.tracking_uri, ctx.experiment_name)
        if run["run_group"].startswith(args.group_prefix)
    ]
    if not runs:
        sys.exit(
            f"frontier: no finished pipeline runs named {args.group_prefix}* in {ctx.tracking_uri} (experiment "
            f"{ctx.experiment_name!r}); run `dvc repro` or a sweep first"
        )
    table = aggregate(frontier_points(runs))
    write_text(frontier_markdown(table), args.markdown)
    plot_frontier(table, args.plot)
    write_text(table.drop(columns="runs").to_csv(index=False), args.points)
    write_text(seeds_markdown(seed_summary(runs)), args.seeds)
    print(frontier_markdown(table))
    print(f"frontier: {len(runs)} pipeline runs -> {args.markdown}, {args.plot}, {args.points}, {args.seeds}")


if __name__ == "__main__":
    main()
