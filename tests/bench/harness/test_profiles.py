"""cProfile summaries per unit of work."""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path

from bench.harness.metadata import REPO_ROOT
from bench.harness.profiles import _function_name, format_top, profile_file_summary, top_functions


def busy(n: int) -> int:
    return sum(i * i for i in range(n))


def profile(steps: int) -> cProfile.Profile:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        busy(20_000)
    profiler.disable()
    return profiler


def test_top_functions_per_step() -> None:
    rows = top_functions(pstats.Stats(profile(4)), "cumulative", per=4, limit=3)
    assert len(rows) == 3
    assert [r["cumtime_us"] for r in rows] == sorted((r["cumtime_us"] for r in rows), reverse=True)
    (mine,) = [r for r in rows if r["function"].endswith("(busy)")]
    assert mine["calls"] == 1.0 and mine["function"].startswith("tests/bench/harness/test_profiles.py:")
    assert "µs" in format_top(rows, "step") and len(format_top(rows, "step").splitlines()) == 4


def test_function_names_are_short() -> None:
    assert _function_name("~", 0, "<built-in method len>") == "<built-in method len>"
    library = "/usr/lib/python3/site-packages/zmq/sugar/socket.py"
    assert _function_name(library, 5, "send") == "zmq/sugar/socket.py:5(send)"
    assert _function_name(str(REPO_ROOT / "bench" / "x.py"), 7, "f") == "bench/x.py:7(f)"


def test_profile_files(tmp_path: Path) -> None:
    assert profile_file_summary(tmp_path / "missing.prof", 1, "step", 5) is None
    path = tmp_path / "p.prof"
    profile(2).dump_stats(path)
    summary = profile_file_summary(path, 2, "step", 3)
    assert summary is not None and summary["per"] == "step" and len(summary["top_cumtime"]) == 3
