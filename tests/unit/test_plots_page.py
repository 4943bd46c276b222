"""The offline plots page: every Vega-Lite spec drawn as SVG, every image embedded, no script, no network."""

import base64

import pytest

from pipeline.eval.plots_page import measured_only, plots_page

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _spec(values):
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": values},
        "mark": "line",
        "encoding": {
            "x": {"field": "step", "type": "quantitative"},
            "y": {"field": "dvc_inferred_y_value", "type": "quantitative"},
        },
    }


def test_every_plot_is_drawn_inline_with_no_script_or_network(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/curve.png").write_bytes(PNG)
    rows = [{"step": "1", "dvc_inferred_y_value": "0.5"}, {"step": "2", "dvc_inferred_y_value": "0.25"}]
    plots = {"Loss": [{"type": "vega", "content": _spec(rows)}], "reports/curve.png": [{"type": "image", "url": None}]}
    page = plots_page(plots, tmp_path)
    assert page.count("<svg") == 1 and page.count("data:image/png;base64,") == 1
    assert "<script" not in page and 'src="http' not in page
    assert "<figcaption>Loss</figcaption>" in page


def test_unmeasured_steps_are_left_out_not_drawn_as_zero():
    rows = [{"step": "1", "dvc_inferred_y_value": "0.5"}, {"step": "2", "dvc_inferred_y_value": ""}]
    assert measured_only(_spec(rows))["data"]["values"] == rows[:1]


def test_an_unknown_plot_type_is_named(tmp_path):
    with pytest.raises(ValueError, match="plot 'x': unknown plot type 'table'"):
        plots_page({"x": [{"type": "table"}]}, tmp_path)
