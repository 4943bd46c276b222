"""Docs command (not a DVC stage): regenerate `docs/params.md` from the config fields and `params.yaml`.

    python -m tools.docs        # or: make docs

A test fails when the committed page differs from what this writes.
"""

from __future__ import annotations

import argparse

from pipeline.config import read_params
from pipeline.config.reference import params_reference
from pipeline.files import write_text


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="docs/params.md")
    args = parser.parse_args()
    write_text(params_reference(read_params(args.params)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
