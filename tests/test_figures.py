"""The dependency-free SVG charts behind docs/frontier.svg and docs/pareto-mor.svg."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import svg_plot  # noqa: E402

NS = "{http://www.w3.org/2000/svg}"


def test_line_chart_draws_every_series_point_and_label():
    svg = svg_plot.line_chart({"fixed": [(1, 400.0), (2, 50.0)], "router": [(1.5, 250.0, "bias 0")]},
                              "loops", "perplexity", title="t", log_y=True, markers_only={"router"})
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter(NS + "text")]
    assert "fixed" in texts and "router" in texts and "bias 0" in texts and "t" in texts
    circles = list(root.iter(NS + "circle"))
    assert len(circles) == 3 + 2  # three points + two legend markers
    assert len(list(root.iter(NS + "polyline"))) == 1  # "router" is markers only
    # log axis: higher perplexity is drawn higher up (smaller y)
    ys = {c.find(NS + "title").text.split(":")[0] + c.get("cx"): float(c.get("cy")) for c in circles
          if c.find(NS + "title") is not None}
    fixed = sorted((float(k[len("fixed"):]), y) for k, y in ys.items() if k.startswith("fixed"))
    assert fixed[0][1] < fixed[1][1]


def test_log_ticks_cover_a_narrow_range_and_empty_input_is_an_error():
    ticks = svg_plot._log_ticks(50, 440)
    assert len(ticks) >= 4 and min(ticks) >= 50 and max(ticks) <= 440
    with pytest.raises(ValueError):
        svg_plot.line_chart({}, "x", "y")

