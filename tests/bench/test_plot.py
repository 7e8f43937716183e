"""bench.plot: the chart of a result file written earlier, drawn beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import plot

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_the_benchmark_is_known_by_schema_or_command() -> None:
    assert plot.benchmark_of({"schema": "loomserve.bench.ablation/1"}) == "bench.ablation"
    assert plot.benchmark_of({"command": "python -m bench.tp_scaling --out r.json"}) == "bench.tp_scaling"
    assert plot.benchmark_of({"schema": "loomserve.bench.hf_baseline/1"}) is None  # no chart: metrics only
    assert plot.benchmark_of({"command": "python -m bench.kernels --out r.json"}) is None


def test_draws_beside_each_file_it_can(tmp_path: Path, capsys) -> None:
    drawable = tmp_path / "gateway.json"
    shutil.copy(RESULTS / "cpu-gateway-cost.json", drawable)
    kernels = tmp_path / "kernels.json"
    kernels.write_text(json.dumps({"device": "x", "rows": []}))
    assert plot.main([str(drawable), str(kernels)]) == 1
    assert (tmp_path / "gateway.png").stat().st_size > 0 and not (tmp_path / "kernels.png").exists()
    out = capsys.readouterr().out
    assert "drew" in out and "kernels.json: nothing to draw" in out
