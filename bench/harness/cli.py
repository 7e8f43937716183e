"""A benchmark's command line: its parser, the result-file option, the GPU it may need and its
console output."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

_started = time.monotonic()


def new_parser(module: str, doc: str | None, *, whole_doc: bool = False) -> argparse.ArgumentParser:
    """A parser for ``python -m <module>``, described by the first paragraph of ``doc`` (the
    module docstring), or by all of it, laid out as written, with ``whole_doc``."""
    if whole_doc:
        return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0] if doc else None)


def add_out(parser: argparse.ArgumentParser, help: str | None = "where to write the JSON results") -> None:
    """``--out PATH``, required: the result file (its chart, if any, goes beside it as a PNG)."""
    parser.add_argument("--out", type=Path, required=True, help=help)


def add_output_json(parser: argparse.ArgumentParser, help: str | None = "write results here") -> None:
    """``--output-json PATH``, optional: the result file (its chart, if any, goes beside it as a PNG)."""
    parser.add_argument("--output-json", type=Path, default=None, help=help)


def cuda_available(module: str, what: str = "a CUDA GPU") -> bool:
    """Whether torch sees a GPU; if not, says on stderr that ``module`` needs one."""
    import torch  # here, so that the CPU-only benchmarks never import it

    if torch.cuda.is_available():
        return True
    print(f"{module} needs {what}", file=sys.stderr)
    return False


def setup_logging(fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=logging.INFO, format=fmt)
    # httpx logs every request at INFO: thousands of lines that would bury the progress.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def elapsed_s() -> float:
    """Seconds since the benchmark started (since this module was imported)."""
    return time.monotonic() - _started


def progress(message: str) -> None:
    """A progress line on stdout, stamped with the seconds since the start."""
    print(f"[{elapsed_s():6.1f} s] {message}", flush=True)
