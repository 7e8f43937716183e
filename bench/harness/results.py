"""Writing a result: its JSON file, and the PNG of its chart beside it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.harness import plots

logger = logging.getLogger(__name__)


def write_json(path: Path, result: Mapping[str, Any]) -> None:
    """Write ``result`` through a temporary file, so that a run cut short (or a reader) finds the
    last complete write, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)


def png_path(json_path: Path) -> Path:
    return json_path.with_suffix(".png")


def write_chart(json_path: Path, chart: plots.Chart | None) -> Path | None:
    """Draw ``chart`` into a PNG beside ``json_path``; the PNG's path, or None where there is no
    chart or no matplotlib (a result never fails for want of a picture)."""
    if chart is None:
        return None
    path = png_path(json_path)
    try:
        plots.render(chart, path)
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'loomserve[bench]'): %s not drawn", path)
        return None
    return path
