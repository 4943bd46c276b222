"""Plots command (not a DVC stage): every `dvc plots` definition rendered to one self-contained, offline page.

    python -m tools.plots        # or: make plots; then open reports/plots.html

Unlike `dvc plots show`, whose page loads Vega from a CDN, the page embeds each plot as SVG or PNG and draws with no
network. `--revisions` compares experiments or commits, as `dvc plots diff` does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline.eval.plots_page import plots_page
from pipeline.files import write_text


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/plots.html")
    parser.add_argument("--revisions", nargs="*", default=[], help="experiments or commits to compare (plots diff)")
    args = parser.parse_args()
    command = ["plots", "diff", *args.revisions] if args.revisions else ["plots", "show"]
    done = subprocess.run([sys.executable, "-m", "dvc", *command, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"dvc {' '.join(command)} --json failed ({done.returncode}):\n{done.stderr}")
    plots = json.loads(done.stdout)["data"]
    write_text(plots_page(plots, Path.cwd()), args.out)
    print(f"wrote {args.out}: {sum(map(len, plots.values()))} plots")


if __name__ == "__main__":
    main()
