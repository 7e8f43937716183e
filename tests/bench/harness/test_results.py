"""Writing a result file and the PNG beside it (drawing itself: test_plots.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.harness import plots, results


def test_json_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / "r.json"
    results.write_json(path, {"b": 1, "path": Path("x/y")})
    results.write_json(path, {"b": 2, "path": Path("x/y")})
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"b": 2, "path": "x/y"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_png_goes_beside_the_json() -> None:
    assert results.png_path(Path("results/run.json")) == Path("results/run.png")


def test_no_chart_no_png(tmp_path: Path) -> None:
    assert results.write_chart(tmp_path / "r.json", None) is None
    assert not list(tmp_path.iterdir())


def test_a_missing_matplotlib_costs_the_picture_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def no_matplotlib(chart: plots.Chart, path: Path) -> None:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "render", no_matplotlib)
    chart = plots.Chart("t", (plots.Panel("p", "x", "y", (plots.series("s", [(1, 2)]),)),))
    assert results.write_chart(tmp_path / "r.json", chart) is None
    assert "matplotlib is not installed" in caplog.text
