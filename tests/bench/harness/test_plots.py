"""Charts drawn into PNG files: the file, its size and what its axes say (no pixel comparisons)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from bench.harness import plots


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_log_axes_for_values_that_span_orders_of_magnitude() -> None:
    assert plots.wide([3.0, 100.0]) and not plots.wide([3.0, 60.0])
    assert not plots.wide([0.0, None, 5.0]) and not plots.wide([])


def test_series_skip_missing_points_and_cdfs_climb_to_one() -> None:
    assert plots.series("s", [(1, 2.0), (2, None), (4, 8.0)]) == plots.Series("s", (1, 4), (2.0, 8.0))
    assert plots.cdf("c", [3.0, 1.0, 2.0, 2.0]) == plots.Series("c", (1.0, 2.0, 2.0, 3.0), (0.25, 0.5, 0.75, 1.0))


def test_render_a_two_panel_chart(tmp_path: Path) -> None:
    chart = plots.Chart("Throughput against concurrency", (
        plots.Panel("throughput", "concurrent requests", "tokens/s",
                    (plots.series("continuous", [(1, 100.0), (8, 700.0), (64, 2500.0)]),
                     plots.series("static", [(1, 100.0), (8, 500.0), (64, 900.0)])),
                    logx=True, xticks=(1, 8, 64)),
        plots.Panel("TTFT distribution", "TTFT (ms)", "fraction of requests",
                    (plots.cdf("continuous", [12.0, 3000.0, 18.0]),), style="step", logx=True),
    ))
    path = tmp_path / "chart.png"
    figure = plots.render(chart, path)
    assert png_size(path) == chart.size_px == (1100, 420)
    assert figure.texts[0].get_text() == "Throughput against concurrency"  # the suptitle
    left, right = figure.axes
    assert (left.get_title(), left.get_xlabel(), left.get_ylabel()) == (
        "throughput", "concurrent requests", "tokens/s")
    assert (left.get_xscale(), right.get_xscale()) == ("log", "log")
    assert [t.get_text() for t in left.get_xticklabels()] == ["1", "8", "64"]
    # Log axes read as plain numbers, not powers of ten.
    assert {"100", "1,000"} <= {t.get_text() for t in right.get_xticklabels()}
    legend = left.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["continuous", "static"]
    assert right.get_legend() is None  # one curve: its label is the panel's
    assert right.get_xlabel() == "TTFT (ms)" and np.asarray(right.lines[0].get_xdata()).tolist() == [12.0, 18.0, 3000.0]
