"""Several gateway processes behind one port (``serve --gateway-workers 2``, SO_REUSEPORT):
the kernel spreads connections over them, each answers its own streams, rate limits held in
Redis stay whole, ``/metrics`` on any of them reports the sum, and SIGTERM drains them all.

Which process served what is read from the kernel and from each process's own metrics file,
never from the service's answers: a connection belongs to the gateway whose socket holds it
(/proc/net/tcp), and a request was served by the gateway whose file counted it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from loomserve.gateway.auth import generate_key
from tests.e2e.reference import Greedy, assert_greedy_close
from tests.exposition import SampleKey, exposed_samples
from tests.stack import ServeStack, descendants, pid_alive

MODEL = "SmolLM2-135M-Instruct"
RUN = uuid.uuid4().hex[:8]
TENANT, LIMITED_TENANT = f"replicas-{RUN}", f"replicas-limited-{RUN}"
KEY, DIGEST = generate_key()
LIMITED_KEY, LIMITED_DIGEST = generate_key()
LIMITED_BURST = 6
PROMPTS = ["The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time, in a small village,",
           "The three primary colors are"]
MAX_TOKENS = 16
TOP = 5
EXTRA = {"return_token_ids": True, "return_tokens_as_token_ids": True}
_LISTEN, _ESTABLISHED = "0A", "01"  # TCP states as /proc/net/tcp writes them


def gateway_pids(stack: ServeStack) -> list[int]:
    """The gateway processes under ``serve`` (``python -m loomserve.cli gateway ...``)."""
    found = []
    for pid in descendants(stack.proc.pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if len(cmdline) > 3 and cmdline[3] == b"gateway":
            found.append(pid)
    return sorted(found)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def sockets_on_port(pids: list[int], port: int, state: str) -> dict[int, int]:
    """How many TCP sockets with local ``port`` in ``state`` each of ``pids`` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        held = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                held += os.readlink(fd) in inodes
            except OSError:  # closed since the listing
                continue
        counts[pid] = held
    return counts


def wait_all_listening(stack: ServeStack, pids: list[int], timeout: float = 60.0) -> None:
    """``/health`` answered by one gateway says nothing of the other: wait until each listens.

    A gateway listens once its start-up is done, which sends its first status query to the
    scheduler; until the answer (milliseconds) it would refuse requests with 503, so wait a
    status interval more."""
    deadline = time.monotonic() + timeout
    while min(sockets_on_port(pids, stack.port, _LISTEN).values()) < 1:
        assert time.monotonic() < deadline, f"not every gateway listens: {stack.log_tail()}"
        time.sleep(0.2)
    time.sleep(1.0)


def metrics_dir(pid: int) -> Path:
    """The multi-process metrics directory ``serve`` gave this gateway."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    return Path(values["PROMETHEUS_MULTIPROC_DIR"])


def requests_counted_by(pid: int) -> float:
    """Requests answered by this gateway process alone, from its own metrics file."""
    path = metrics_dir(pid) / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return sum(s.value for metric in MultiProcessCollector.merge([str(path)]) for s in metric.samples
               if s.name == "loomserve_requests_total")


def scrape(stack: ServeStack) -> dict[SampleKey, float]:
    """``/metrics`` over a fresh connection (so any gateway may answer): (name, labels) -> value."""
    return exposed_samples(httpx.get(stack.base_url + "/metrics", headers={"x-api-key": KEY}, timeout=30).text)


def total(samples: dict[SampleKey, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def _start(folder: Path, *args: str) -> ServeStack:
    """``serve`` with two gateways, once both listen."""
    stack = ServeStack("--gateway-workers", "2", "--kv-cache-gb", "0.25", "--response-cache", "false", *args,
                       log_path=folder / "serve.log")
    try:
        stack.wait_ready()
        wait_all_listening(stack, gateway_pids(stack))
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[ServeStack]:
    """Two gateways with the rate limits in the machine's Redis; tenants unique per run."""
    folder = tmp_path_factory.mktemp("replicas")
    keys = folder / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"tenant": TENANT, "name": "main", "sha256": DIGEST},
        {"tenant": LIMITED_TENANT, "name": "limited", "sha256": LIMITED_DIGEST,
         "limits": {"requests_per_minute": LIMITED_BURST, "request_burst": LIMITED_BURST}},
    ]}))
    stack = _start(folder, "--keys-file", str(keys), "--redis-url", "redis://127.0.0.1:6379/0")
    try:
        yield stack
    finally:
        assert stack.stop() == 0, stack.log_tail()


def _greedy(choice: Any) -> Greedy:
    tops = [{int(k.split(":", 1)[1]): v for k, v in top.items()} for top in choice.logprobs.top_logprobs]
    return Greedy(choice.model_extra["token_ids"], tops)


def test_streams_spread_over_the_gateways_and_metrics_add_up(replicas: ServeStack) -> None:
    gateways = gateway_pids(replicas)
    assert len(gateways) == 2 and all(parent_of(pid) == replicas.proc.pid for pid in gateways)
    client = openai.OpenAI(base_url=replicas.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    solo = {}
    for prompt in PROMPTS:
        resp: Any = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              logprobs=TOP, extra_body=EXTRA)
        solo[prompt] = (_greedy(resp.choices[0]), resp.choices[0].text)
    before = {pid: requests_counted_by(pid) for pid in gateways}
    before_total = total(scrape(replicas), "loomserve_requests_total")
    streams = [PROMPTS[i % len(PROMPTS)] for i in range(24)]

    async def one(prompt: str, client: openai.AsyncOpenAI) -> tuple[Greedy, str, str | None]:
        ids: list[int] = []
        tops: list[dict[int, float]] = []
        text, finish = "", None
        stream: Any = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                       temperature=0, logprobs=TOP, stream=True, extra_body=EXTRA)
        async for chunk in stream:
            for choice in chunk.choices:
                ids += choice.model_extra["token_ids"]
                tops += [{int(k.split(":", 1)[1]): v for k, v in t.items()} for t in choice.logprobs.top_logprobs]
                text += choice.text
                finish = choice.finish_reason or finish
        return Greedy(ids, tops), text, finish

    async def all_at_once() -> list[tuple[Greedy, str, str | None]]:
        # Concurrent streams: one connection each, hashed by the kernel to either gateway.
        async with openai.AsyncOpenAI(base_url=replicas.base_url + "/v1", api_key=KEY, max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(one(p, aclient) for p in streams))

    results = asyncio.run(all_at_once())
    for i, (prompt, (greedy, text, finish)) in enumerate(zip(streams, results, strict=True)):
        reference, reference_text = solo[prompt]
        assert_greedy_close(reference, greedy, f"stream {i}")
        assert finish in ("stop", "length")
        if greedy.token_ids == reference.token_ids:
            assert text == reference_text
    served = {pid: requests_counted_by(pid) - before[pid] for pid in gateways}
    assert all(n > 0 for n in served.values()), f"one gateway served every stream: {served}"
    assert sum(served.values()) == len(streams)
    assert all(pid_alive(pid) for pid in gateways)
    kv_blocks = replicas.get("/health")[1]["kv_blocks"]
    for _ in range(8):  # each scrape on a fresh connection: either gateway answers, both must agree
        samples = scrape(replicas)
        assert total(samples, "loomserve_requests_total") - before_total == len(streams)
        assert total(samples, "loomserve_e2e_latency_seconds_count") >= len(PROMPTS) + len(streams)
        # the scheduler's numbers come once, from the answering gateway's status, not summed
        assert samples[("loomserve_kv_blocks_total", ())] == kv_blocks


def test_rate_limits_in_redis_hold_across_the_gateways(replicas: ServeStack) -> None:
    gateways = gateway_pids(replicas)
    before = {pid: requests_counted_by(pid) for pid in gateways}
    attempts = 16

    async def one(client: openai.AsyncOpenAI) -> int:
        try:
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=1, temperature=0.5)
        except openai.RateLimitError:
            return 429
        return 200

    async def all_at_once() -> list[int]:
        async with openai.AsyncOpenAI(base_url=replicas.base_url + "/v1", api_key=LIMITED_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(attempts)))

    statuses = asyncio.run(all_at_once())
    assert statuses.count(200) == LIMITED_BURST, statuses
    answered = {pid: requests_counted_by(pid) - before[pid] for pid in gateways}
    assert all(n > 0 for n in answered.values()), f"one gateway answered every request: {answered}"
    rejected = total(scrape(replicas), "loomserve_rate_limit_rejections_total", tenant=LIMITED_TENANT)
    assert rejected == attempts - LIMITED_BURST


@pytest.mark.parametrize("limits", ["flag", "keys-file"])
def test_local_rate_limits_with_several_gateways_are_refused(tmp_path: Path, limits: str) -> None:
    """Without Redis each gateway would keep its own buckets and admit N times the limit."""
    if limits == "flag":
        args = ["--rate-limit-rpm", "10"]
        named = "--rate-limit-rpm"
    else:
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps({"keys": [{"tenant": "acme", "name": "ci", "sha256": DIGEST,
                                              "limits": {"tokens_per_minute": 1000}}]}))
        args = ["--keys-file", str(keys)]
        named = f"per-key limits in --keys-file {keys}"
    stack = ServeStack("--gateway-workers", "2", *args, log_path=tmp_path / "serve.log")
    assert stack.proc.wait(60) == 2
    log = (tmp_path / "serve.log").read_text()
    assert f"--gateway-workers 2 with {named} and no --redis-url" in log
    assert "Pass --redis-url to share the limits, or use --gateway-workers 1." in log
    assert "started scheduler" not in log  # refused before any process started


def test_a_gateway_that_dies_stops_the_service(tmp_path: Path, default_model_path: Path) -> None:
    stack = _start(tmp_path)
    try:
        gateways = gateway_pids(stack)
        os.kill(gateways[1], signal.SIGKILL)
        assert stack.proc.wait(60) == 1
    finally:
        stack.stop()
    log = (tmp_path / "serve.log").read_text()
    name = "gateway-1" if f"started gateway-1 (pid {gateways[1]})" in log else "gateway-2"
    assert f"{name} exited with code -9; stopping the others" in log
    assert not any(pid_alive(pid) for pid in gateways)


def test_sigterm_drains_every_gateway(tmp_path: Path, default_model_path: Path) -> None:
    stack = _start(tmp_path)
    gateways = gateway_pids(stack)

    async def consume(response: Any) -> list[str]:
        return [line[6:] async for line in response.iter_lines() if line.startswith("data: ")]

    async def sigterm_mid_streams() -> tuple[list[list[str]], dict[int, int]]:
        async with AsyncExitStack() as opened, openai.AsyncOpenAI(
                base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            tasks: list[asyncio.Task[list[str]]] = []
            held = dict.fromkeys(gateways, 0)
            # Open streams until each gateway holds two of them (the kernel picks the gateway).
            while min(held.values()) < 2 and len(tasks) < 24:
                response = await opened.enter_async_context(client.completions.with_streaming_response.create(
                    model=MODEL, prompt="Tell me a story.", max_tokens=48, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
                tasks.append(asyncio.create_task(consume(response)))
                held = sockets_on_port(gateways, stack.port, _ESTABLISHED)
            os.kill(stack.proc.pid, signal.SIGTERM)
            return list(await asyncio.gather(*tasks)), held

    try:
        streams, held = asyncio.run(sigterm_mid_streams())
        assert min(held.values()) >= 2, f"streams open per gateway at SIGTERM: {held}"
        for lines in streams:
            assert lines[-1] == "[DONE]"
            assert json.loads(lines[-2])["usage"]["completion_tokens"] == 48
    finally:
        code = stack.stop()
    assert code == 0
    assert not descendants(stack.proc.pid) and not any(pid_alive(pid) for pid in gateways)
    log = (tmp_path / "serve.log").read_text()
    for name in ("gateway-1", "gateway-2"):
        assert f"{name} loomserve.gateway.server: gateway stopped" in log
