"""One real `loomserve serve` stack shared by the end-to-end tests of a module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.stack import ServeStack


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeStack]:
    log = tmp_path_factory.mktemp("stack") / "serve.log"
    # No response cache: these tests compare real generations (the cache has its own tests).
    server = ServeStack("--kv-cache-gb", "0.5", "--max-num-batched-tokens", "1024", "--response-cache", "false",
                        log_path=log)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, server.log_tail()


@pytest.fixture
def client(stack: ServeStack) -> Iterator[openai.OpenAI]:
    """An OpenAI client; after the test, the engine must hold no request and no KV block."""
    with openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
    stack.wait_idle()


@pytest.fixture
def async_client(stack: ServeStack) -> Iterator[openai.AsyncOpenAI]:
    yield openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    stack.wait_idle()
