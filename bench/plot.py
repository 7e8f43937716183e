"""Draw the chart of result files already written, as a PNG beside each: what the benchmark
itself draws at the end of a run, for results from before it did, or from a machine without
matplotlib.

    python -m bench.plot bench/results/h200-ablation-8b-seqs-512.json bench/results/cpu-batching.json

The benchmark that wrote a file is known from its ``schema``, or for files without one from
their ``command``. A file whose benchmark draws no chart, or whose data has nothing to draw, is
reported and left alone; the exit status is 1 if any file was.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness.cli import new_parser
from bench.harness.plots import render
from bench.harness.results import png_path

# The benchmarks that draw a chart, by the schema of their result files ...
BY_SCHEMA = {
    "loomserve.bench.ablation/1": "bench.ablation",
    "loomserve.bench.serving/1": "bench.serving",
    "loomserve.bench.compare_serving/1": "bench.compare_serving",
    "loomserve.bench.gateway_cost/1": "bench.gateway_cost",
    "loomserve.bench.scheduler_cost/1": "bench.scheduler_cost",
}
# ... and those whose files have no schema, by their command.
BY_COMMAND = ("bench.tp_scaling",)


def benchmark_of(result: dict[str, Any]) -> str | None:
    """The module that wrote ``result`` and draws its chart, None if none does."""
    if (schema := result.get("schema")) is not None:
        return BY_SCHEMA.get(schema)
    command = str(result.get("command", "")).split()
    return next((module for module in BY_COMMAND if module in command), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser("bench.plot", __doc__)
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULT.json")
    args = parser.parse_args(argv)
    missed = 0
    for path in args.results:
        result = json.loads(path.read_text())
        module = benchmark_of(result)
        chart = None if module is None else importlib.import_module(module).figure(result)
        if chart is None:
            print(f"{path}: nothing to draw ({module or 'no benchmark draws this file'})")
            missed += 1
            continue
        render(chart, png_path(path))
        print(f"{path}: drew {png_path(path)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
