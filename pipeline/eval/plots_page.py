"""Every `dvc plots` definition on one self-contained HTML page that draws offline.

`dvc plots show` writes a page that loads Vega from a CDN, so offline its CSV plots stay blank. Here each Vega-Lite
spec (`dvc plots show --json`, data inline) is rendered to SVG by `vl-convert` (which bundles the Vega engine) and
each image plot is embedded as a data URI: the page needs no script and no network.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Y = "dvc_inferred_y_value"  # the column DVC's templates plot on the y axis


def measured_only(spec: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` without the rows whose y value is empty: a CSV with train and val columns leaves val empty on the
    steps it was not measured, which Vega would draw as 0 (a validation curve dropping to zero between its points)."""
    values = spec.get("data", {}).get("values")
    if values is None:
        return dict(spec)
    return {**spec, "data": {**spec["data"], "values": [row for row in values if row.get(Y, 0) != ""]}}


def render_plot(entry: Mapping[str, Any], name: str, root: Path) -> str:
    """One plot of `dvc plots show --json` as an HTML figure: a Vega-Lite spec as inline SVG, an image as a data URI.

    Args:
        entry: `{"type": "vega", "content": spec}` or `{"type": "image", "url": path}`.
        name: the plot's id (an image's id is its path relative to `root`).
    """
    if entry["type"] == "vega":
        import vl_convert

        body = vl_convert.vegalite_to_svg(measured_only(entry["content"]))
    elif entry["type"] == "image":
        path = Path(entry.get("url") or "")
        path = path if path.is_file() else root / name
        data = base64.b64encode(path.read_bytes()).decode()
        body = f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
    else:
        raise ValueError(f"plot {name!r}: unknown plot type {entry['type']!r} in `dvc plots show --json`")
    return f"<figure><figcaption>{html.escape(name)}</figcaption>{body}</figure>"


def plots_page(plots: Mapping[str, Sequence[Mapping[str, Any]]], root: Path, *, title: str = "Pipeline plots") -> str:
    """The whole page: every plot of `plots` (the `data` of `dvc plots show --json`), in its order."""
    figures = [render_plot(entry, name, root) for name, entries in plots.items() for entry in entries]
    style = (
        "body{font-family:sans-serif;margin:24px}figure{display:inline-block;vertical-align:top;margin:12px;"
        "border:1px solid #ddd;padding:8px}figcaption{font-weight:bold;margin-bottom:6px}"
        "img{max-width:640px}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(figures)
        + "\n</body></html>\n"
    )
