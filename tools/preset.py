"""Preset command (not a DVC stage): apply a real-task preset from `presets/<name>.yaml` to `params.yaml`.

    python -m tools.preset imdb        # or: make preset PRESET=imdb
    dvc repro

A preset holds only the keys it changes. They are written into `params.yaml` in place, keeping its comments and
every other key, after the merged file passed the same validation every stage runs (so a preset never leaves a
broken params file). `git checkout params.yaml` returns to the embedded default; `dvc exp run -S` still overrides
single keys on top of a preset.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from ruamel.yaml import YAML

from pipeline.config import ConfigError, load_config
from pipeline.files import write_text

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def apply_preset(params: str, preset: Path) -> tuple[str, list[str]]:
    """Merge `preset` into the `params` YAML text's sections; return the new text and the changed keys."""
    yaml = YAML()
    yaml.preserve_quotes = True
    document, overrides = yaml.load(params), yaml.load(preset.read_text())
    changed = []
    for section, values in overrides.items():
        if not isinstance(values, dict) or section not in document:
            raise ConfigError(f"{preset}: {section!r} is not a params section with keys; see params.yaml")
        for key, value in values.items():
            if key not in document[section]:
                raise ConfigError(
                    f"{preset}: {section}.{key} is not a params key; valid keys: {', '.join(document[section])}"
                )
            if document[section][key] != value:
                document[section][key] = value
                changed.append(f"{section}.{key} = {value}")
    load_config(document)  # the same checks every stage runs, before anything is written
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue(), changed


def main() -> None:
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    parser = argparse.ArgumentParser(prog="python -m tools.preset", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=names, help="the preset")
    parser.add_argument("--params", default="params.yaml", help="the params file to update")
    args = parser.parse_args()
    try:
        text, changed = apply_preset(Path(args.params).read_text(), PRESETS / f"{args.name}.yaml")
    except ConfigError as error:
        sys.exit(f"preset {args.name}: {error}")
    write_text(text, args.params)
    print(f"preset {args.name}: {len(changed)} key(s) set in {args.params}:\n  " + "\n  ".join(changed))
    print("next: dvc repro (git checkout params.yaml returns to the embedded default)")


if __name__ == "__main__":
    main()
