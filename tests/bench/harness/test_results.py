"""Writing a result file."""

from __future__ import annotations

import json
from pathlib import Path

from bench.harness import results


def test_json_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / "r.json"
    results.write_json(path, {"b": 1, "path": Path("x/y")})
    results.write_json(path, {"b": 2, "path": Path("x/y")})
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"b": 2, "path": "x/y"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left
