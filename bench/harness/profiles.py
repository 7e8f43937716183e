"""cProfile summaries: the heaviest functions, per unit of work (a step, a streamed token)."""

from __future__ import annotations

import io
import logging
import pstats
from pathlib import Path
from typing import Any

from bench.harness.metadata import REPO_ROOT

logger = logging.getLogger(__name__)


def top_functions(stats: pstats.Stats, sort: str, per: int, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` heaviest functions by ``sort``, times in µs per ``per`` (steps, tokens...)."""
    key = 2 if sort == "tottime" else 3
    # pstats keeps (file, line, name) -> (primitive calls, calls, tottime, cumtime, callers)
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(entries.items(), key=lambda item: item[1][key], reverse=True)[:limit]
    return [
        {
            "function": _function_name(file, line, name),
            "calls": calls / per,
            "tottime_us": tottime * 1e6 / per,
            "cumtime_us": cumtime * 1e6 / per,
        }
        for (file, line, name), (_, calls, tottime, cumtime, _) in rows
    ]


def _function_name(file: str, line: int, name: str) -> str:
    if file == "~":
        return name  # a builtin: "<method 'send' of ...>"
    # Short paths: relative to the repository, or from the package directory for libraries.
    _, site, package_path = file.rpartition("site-packages/")
    if site:
        file = package_path
    elif Path(file).is_relative_to(REPO_ROOT):
        file = str(Path(file).relative_to(REPO_ROOT))
    return f"{file}:{line}({name})"


def format_top(rows: list[dict[str, Any]], unit: str) -> str:
    lines = [f"{'calls':>8} {'tottime':>10} {'cumtime':>10}  function   (per {unit}, times in µs)"]
    lines += [f"{r['calls']:>8.1f} {r['tottime_us']:>10.1f} {r['cumtime_us']:>10.1f}  {r['function']}" for r in rows]
    return "\n".join(lines)


def profile_file_summary(path: Path, per: int, unit: str, top: int) -> dict[str, Any] | None:
    """Top functions of a cProfile output file written by a profiled child process."""
    if not path.exists():
        logger.warning("no profile at %s (did the process exit cleanly?)", path)
        return None
    stats = pstats.Stats(str(path), stream=io.StringIO())
    return {
        "path": str(path),
        "per": unit,
        "top_tottime": top_functions(stats, "tottime", per, top),
        "top_cumtime": top_functions(stats, "cumulative", per, top),
    }
