"""The README's first example, run as written against the stack `make serve` starts."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import ServeStack

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python_example() -> str:
    """The first ```python block of the README."""
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match is not None, "README.md has no python example"
    return match.group(1)


@pytest.fixture(scope="module")
def make_serve_stack(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeStack]:
    """`loomserve serve` with no options but the port, as `make serve` runs it."""
    server = ServeStack(log_path=tmp_path_factory.mktemp("readme") / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


def test_the_readme_example_prints_a_short_right_answer(make_serve_stack: ServeStack) -> None:
    code = readme_python_example()
    assert 'base_url="http://127.0.0.1:8000/v1"' in code and "max_tokens=" in code
    # The one change: the port this test's server listens on instead of make serve's 8000.
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{make_serve_stack.port}")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answer = run.stdout.strip()
    assert "Paris" in answer, answer
    assert len(answer) < 300, answer


def test_start_up_says_which_sampling_defaults_are_in_force(make_serve_stack: ServeStack) -> None:
    assert make_serve_stack.log_path is not None
    log = make_serve_stack.log_path.read_text()
    assert ("requests that leave sampling fields out get temperature=0.2, top_p=0.9 (the default model's card; "
            "other fields as OpenAI's)") in log
