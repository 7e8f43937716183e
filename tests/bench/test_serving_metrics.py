"""run_benchmark against a fake streaming server whose timing is known.

The fake server waits TTFT_S before the first token and ITL_S between tokens. The base URL's
first path segment picks its behaviour (``/ok``, ``/pairs``, ``/broken`` ...), so one
server covers every case.
"""

import asyncio
import json
import math
import multiprocessing
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.serving import (
    BenchConfig,
    LatencySummary,
    RequestOutcome,
    compute_metrics,
    figure,
    main,
    merge_outcomes,
    poisson_arrivals,
    run_benchmark,
    shard_requests,
    split_concurrency,
)
from bench.workloads import BenchRequest, Workload

TTFT_S = 0.10
ITL_S = 0.04
MODEL = "fake-model"
API_KEY = "sekrit"


def sse(payload: object) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def token_events(mode: str, body: dict, chat: bool) -> AsyncIterator[str]:
    num_tokens = body["max_tokens"]
    prompt = body["messages"][0]["content"] if chat else body["prompt"]
    prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
    if chat:
        # A role-only first chunk: it carries no content, so it must not end TTFT.
        yield sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    if mode == "stall":
        await asyncio.sleep(30)
    await asyncio.sleep(TTFT_S)
    per_chunk = 2 if mode == "pairs" else 1
    for first in range(0, num_tokens, per_chunk):
        if first:
            await asyncio.sleep(ITL_S)
        text = "".join(f" t{i}" for i in range(first, min(num_tokens, first + per_chunk)))
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        yield sse({"choices": [choice]})
    end = {"index": 0, "finish_reason": "length"}
    yield sse({"choices": [{**end, "delta": {}} if chat else {**end, "text": ""}]})
    if mode != "nousage":
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": num_tokens,
            "total_tokens": prompt_tokens + num_tokens,
        }
        yield sse({"choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def make_app() -> Starlette:
    calls = {"flaky": 0}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def generate(request: Request) -> Response:
        mode = request.path_params["mode"]
        if mode == "broken":
            return JSONResponse({"error": {"message": "engine exploded"}}, status_code=500)
        if mode == "flaky":
            calls["flaky"] += 1
            if calls["flaky"] % 2 == 0:
                return JSONResponse({"error": {"message": "every other"}}, status_code=500)
        if mode == "auth" and request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        chat = request.url.path.endswith("/chat/completions")
        return StreamingResponse(token_events(mode, body, chat), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/{mode}/v1/models", models),
            Route("/{mode}/v1/completions", generate, methods=["POST"]),
            Route("/{mode}/v1/chat/completions", generate, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    # Port 0: the OS picks a free port, read back once the server listens.
    config = uvicorn.Config(make_app(), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def workload(num_requests: int, output_len: int, text: bool = False) -> Workload:
    prompt: str | list[int] = "a b c d e f" if text else [1, 2, 3, 4, 5, 6]
    requests = tuple(BenchRequest(prompt, 6, output_len) for _ in range(num_requests))
    return Workload(name="fixed", requests=requests)


def bench(url: str, mode: str, work: Workload, **options) -> BenchConfig:
    return BenchConfig(workload=work, base_url=f"{url}/{mode}", **options)


def late_bound(expected: float, floor: float) -> float:
    """How late a measurement may be when other work shares a small, busy test machine.

    Being late is real (the chunk did arrive late), so only lower bounds are exact; the
    per-request relations checked beside these are exact under any load.
    """
    return expected * 2 + floor


def assert_at_least_ms(summary: LatencySummary | None, expected_ms: float, field: str = "median"):
    """For TTFT and E2EL, which can never be shorter than the server's sleeps: the client
    sends before the server starts sleeping and reads after it wrote."""
    assert summary is not None
    value = getattr(summary, field)
    assert expected_ms - 1.0 <= value <= late_bound(expected_ms, 100.0), (field, value, expected_ms)


def assert_about_ms(summary: LatencySummary | None, expected_ms: float, field: str = "median"):
    """For gaps (ITL, TPOT): a late chunk shortens the gap after it, so both ways."""
    assert summary is not None
    value = getattr(summary, field)
    assert expected_ms * 0.5 <= value <= late_bound(expected_ms, 30.0), (field, value, expected_ms)


def test_timings_match_the_server_sleeps(server_url):
    # Decode (11 gaps) outlasts TTFT by far, so a TTFT taken at the wrong chunk shows.
    num_requests, output_len, concurrency = 4, 12, 2
    config = bench(server_url, "ok", workload(num_requests, output_len), concurrency=concurrency)
    result = asyncio.run(run_benchmark(config))
    m = result.metrics

    assert result.model == MODEL
    assert (m.completed, m.failed, m.errors) == (4, 0, [])
    assert m.total_output_tokens == num_requests * output_len
    assert m.total_input_tokens == num_requests * 6
    assert m.output_len_mismatches == 0
    assert_at_least_ms(m.ttft_ms, TTFT_S * 1000)
    assert_at_least_ms(m.ttft_ms, TTFT_S * 1000, "mean")
    assert_about_ms(m.itl_ms, ITL_S * 1000)
    assert_about_ms(m.tpot_ms, ITL_S * 1000, "mean")
    expected_e2el_s = TTFT_S + (output_len - 1) * ITL_S
    assert_at_least_ms(m.e2el_ms, expected_e2el_s * 1000)
    for o in result.outcomes:
        assert o.ttft_s is not None and o.e2el_s is not None and o.tpot_s is not None
        assert len(o.itls_s) == output_len - 1
        # The gaps span first to last content chunk, which E2EL - TTFT contains.
        assert sum(o.itls_s) <= o.e2el_s - o.ttft_s
        assert o.tpot_s == pytest.approx((o.e2el_s - o.ttft_s) / (output_len - 1))

    # Two waves of two requests each: the run lasts about two request latencies.
    waves = num_requests // concurrency
    assert waves * expected_e2el_s <= m.duration_s <= late_bound(waves * expected_e2el_s, 0.2)
    assert m.request_throughput == pytest.approx(num_requests / m.duration_s)
    assert m.output_throughput == pytest.approx(num_requests * output_len / m.duration_s)
    assert m.total_token_throughput == pytest.approx(num_requests * (6 + output_len) / m.duration_s)


def test_unlimited_concurrency_sends_everything_at_once(server_url):
    config = bench(server_url, "ok", workload(6, 4))
    m = asyncio.run(run_benchmark(config)).metrics
    one_request_s = TTFT_S + 3 * ITL_S
    assert m.completed == 6
    assert one_request_s <= m.duration_s <= late_bound(one_request_s, 0.2)
    assert_at_least_ms(m.ttft_ms, TTFT_S * 1000, "p99")


def test_output_tokens_come_from_usage_not_chunks(server_url):
    # Chat endpoint, two tokens per chunk, after a content-free role chunk.
    output_len = 8
    config = bench(server_url, "pairs", workload(2, output_len, text=True), endpoint="chat")
    result = asyncio.run(run_benchmark(config))
    m = result.metrics
    assert m.completed == 2 and m.total_output_tokens == 2 * output_len
    assert_at_least_ms(m.ttft_ms, TTFT_S * 1000)
    assert all(len(o.itls_s) == output_len // 2 - 1 for o in result.outcomes)
    assert_about_ms(m.itl_ms, ITL_S * 1000)
    # TPOT spreads the decode time over tokens, not chunks.
    decode_ms = (output_len // 2 - 1) * ITL_S * 1000
    assert_about_ms(m.tpot_ms, decode_ms / (output_len - 1), "mean")


def test_server_errors_count_as_failures(server_url):
    result = asyncio.run(run_benchmark(bench(server_url, "broken", workload(5, 4))))
    m = result.metrics
    assert (m.completed, m.failed) == (0, 5)
    assert m.ttft_ms is None and m.tpot_ms is None and m.itl_ms is None and m.e2el_ms is None
    assert m.request_throughput == 0 and m.output_throughput == 0
    assert len(m.errors) == 5
    assert m.errors[0].startswith("request 0: HTTP 500") and "engine exploded" in m.errors[0]


def test_some_failures_leave_the_rest_measured(server_url):
    config = bench(server_url, "flaky", workload(6, 4), max_error_messages=2)
    m = asyncio.run(run_benchmark(config)).metrics
    assert (m.completed, m.failed) == (3, 3)
    assert len(m.errors) == 2
    assert m.total_output_tokens == 3 * 4
    assert_at_least_ms(m.ttft_ms, TTFT_S * 1000)


def test_a_stream_without_usage_fails(server_url):
    m = asyncio.run(run_benchmark(bench(server_url, "nousage", workload(2, 3)))).metrics
    assert (m.completed, m.failed) == (0, 2)
    assert "no usage" in m.errors[0]


def test_a_request_past_its_timeout_fails_without_stalling_the_run(server_url):
    config = bench(server_url, "stall", workload(2, 3), request_timeout_s=0.3)
    started = time.perf_counter()
    m = asyncio.run(run_benchmark(config)).metrics
    assert time.perf_counter() - started < 5
    assert (m.completed, m.failed) == (0, 2)
    assert "no complete response within 0.3 s" in m.errors[0]


def closed_port_url() -> str:
    """A loopback URL where nothing listens: a port just bound and released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_an_unreachable_server_fails_every_request():
    config = BenchConfig(workload=workload(3, 2), base_url=closed_port_url(), model="m")
    m = asyncio.run(run_benchmark(config)).metrics
    assert (m.completed, m.failed) == (0, 3)
    assert "ConnectError" in m.errors[0]


def test_poisson_arrivals():
    assert poisson_arrivals(3, math.inf, 0) == [0.0, 0.0, 0.0]
    arrivals = poisson_arrivals(20_000, 50.0, seed=1)
    assert arrivals == poisson_arrivals(20_000, 50.0, seed=1)
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert arrivals[-1] / (len(arrivals) - 1) == pytest.approx(1 / 50.0, rel=0.03)


def test_request_rate_spaces_the_sends(server_url):
    config = bench(server_url, "ok", workload(4, 2), request_rate=20.0, seed=3)
    m = asyncio.run(run_benchmark(config)).metrics
    assert m.completed == 4
    assert m.duration_s >= poisson_arrivals(4, 20.0, 3)[-1] + TTFT_S + ITL_S


def test_client_processes_start_on_one_schedule(server_url):
    # Spawned processes take a second or more to start: were each to start its own clock when
    # ready, the run would last far longer than one request.
    config = bench(server_url, "ok", workload(6, 4), client_processes=2)
    result = asyncio.run(run_benchmark(config))
    m = result.metrics
    one_request_s = TTFT_S + 3 * ITL_S
    assert m.completed == 6 and config.num_client_processes == 2
    assert one_request_s <= m.duration_s <= late_bound(one_request_s, 0.2)
    assert result.client_cpu_s > 0


def test_client_processes_keep_the_arrival_times(server_url):
    config = bench(server_url, "ok", workload(4, 2), request_rate=20.0, seed=3, client_processes=2)
    m = asyncio.run(run_benchmark(config)).metrics
    assert m.completed == 4
    last_arrival = poisson_arrivals(4, 20.0, 3)[-1]
    assert last_arrival + TTFT_S + ITL_S <= m.duration_s <= last_arrival + late_bound(TTFT_S + ITL_S, 0.2)


def test_requests_are_dealt_round_robin_and_the_concurrency_split():
    requests = tuple(BenchRequest([i], 1, i + 1) for i in range(10))
    config = BenchConfig(Workload("w", requests), concurrency=10, client_processes=4)
    arrivals = [0.5 * i for i in range(10)]
    shards = shard_requests(config, "m", arrivals)
    assert [[r.output_len - 1 for r in s.config.workload.requests] for s in shards] == [
        [0, 4, 8], [1, 5, 9], [2, 6], [3, 7],
    ]  # fmt: skip
    assert [s.arrivals for s in shards] == [(0.0, 2.0, 4.0), (0.5, 2.5, 4.5), (1.0, 3.0), (1.5, 3.5)]
    assert [s.config.concurrency for s in shards] == [3, 3, 2, 2]
    assert all(s.model == "m" and s.config.client_processes == 1 for s in shards)
    outcomes = [[RequestOutcome(1, r.output_len) for r in s.config.workload.requests] for s in shards]
    assert [o.planned_output_len for o in merge_outcomes(outcomes)] == list(range(1, 11))

    assert split_concurrency(None, 3) == [None, None, None]
    assert split_concurrency(7, 1) == [7]
    with pytest.raises(ValueError, match="cannot be split"):
        split_concurrency(2, 3)
    # Never a process without a request or a concurrency slot.
    assert BenchConfig(Workload("w", requests[:3]), client_processes=4).num_client_processes == 3
    assert BenchConfig(Workload("w", requests), concurrency=2, client_processes=4).num_client_processes == 2
    assert BenchConfig(Workload("w", requests), client_processes=4).num_client_processes == 4
    with pytest.raises(ValueError, match="client_processes"):
        BenchConfig(Workload("w", requests), client_processes=0)


def test_perf_counter_is_one_clock_for_every_process():
    """What comparing first sends and last responses across client processes relies on."""
    before = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(time.perf_counter)
    assert before < child < time.perf_counter()


def test_compute_metrics_follows_the_definitions():
    outcomes = [
        RequestOutcome(10, 5, output_tokens=5, ttft_s=0.1, e2el_s=0.5, itls_s=[0.1] * 4),
        RequestOutcome(20, 1, output_tokens=1, ttft_s=0.3, e2el_s=0.3),
        RequestOutcome(30, 4, error="HTTP 503: busy"),
        RequestOutcome(40, 4, output_tokens=3, ttft_s=0.2, e2el_s=0.6, itls_s=[0.1, 0.3]),
    ]
    m = compute_metrics(outcomes, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert m.errors == ["request 2: HTTP 503: busy"]
    assert (m.total_input_tokens, m.total_output_tokens) == (70, 9)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(39.5)
    # Percentiles interpolate linearly between the sorted samples 100, 200, 300 ms.
    assert m.ttft_ms is not None
    ttft = (m.ttft_ms.mean, m.ttft_ms.median, m.ttft_ms.p95, m.ttft_ms.p99)
    assert ttft == pytest.approx((200, 200, 290, 298))
    # TPOT only for requests of two or more tokens: 400/4 = 100 ms and 400/2 = 200 ms.
    assert m.tpot_ms is not None
    assert (m.tpot_ms.mean, m.tpot_ms.median) == (pytest.approx(150), pytest.approx(150))
    assert m.itl_ms is not None and m.itl_ms.mean == pytest.approx(1000 * 0.8 / 6)
    assert m.e2el_ms is not None and m.e2el_ms.median == pytest.approx(500)
    # The 4-token request that stopped at 3 did not honour ignore_eos.
    assert m.output_len_mismatches == 1
    assert compute_metrics(outcomes, 2.0, ignore_eos=False).output_len_mismatches is None


def test_chat_refuses_token_id_prompts():
    with pytest.raises(ValueError, match="text prompts"):
        BenchConfig(workload=workload(1, 2), endpoint="chat")


def test_cli_writes_the_result_file(server_url, tmp_path, capsys):
    dataset = tmp_path / "w.jsonl"
    dataset.write_text(
        "".join(json.dumps({"prompt": "one two three", "prompt_len": 3, "output_len": 3}) + "\n" for _ in range(3))
    )
    out = tmp_path / "runs" / "result.json"
    argv = [
        "--base-url", f"{server_url}/auth", "--api-key", API_KEY, "--workload", str(dataset),
        "--concurrency", "2", "--output-json", str(out), "--label", "smoke",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "TTFT" in capsys.readouterr().out

    result = json.loads(out.read_text())
    assert result["schema"] == "loomserve.bench.serving/1"
    assert result["label"] == "smoke"
    assert set(result["metadata"]) == {
        "date", "command", "git_commit", "git_dirty", "host", "platform", "python",
    }  # fmt: skip
    assert API_KEY not in result["metadata"]["command"]
    assert "--api-key '***'" in result["metadata"]["command"]
    assert result["config"]["model"] == MODEL
    assert result["config"]["request_rate"] is None
    assert result["config"]["client_processes"] == 1
    assert result["workload"]["name"] == "jsonl" and result["workload"]["num_requests"] == 3
    metrics = result["metrics"]
    assert (metrics["completed"], metrics["failed"]) == (3, 0)
    assert metrics["total_output_tokens"] == 9
    assert set(metrics["ttft_ms"]) == {"mean", "median", "p95", "p99"}
    assert metrics["client_cpu_s"] > 0
    assert metrics["client_cpu_us_per_output_token"] == pytest.approx(metrics["client_cpu_s"] * 1e6 / 9)
    assert len(result["requests"]) == 3 and result["requests"][0]["error"] is None
    # Beside it, the chart of its TTFT and TPOT distributions.
    assert out.with_suffix(".png").stat().st_size > 0
    chart = figure(result)
    assert chart is not None and chart.title == "smoke: jsonl, 3 requests, concurrency 2, all at once"
    ttft, tpot = chart.panels
    assert sorted(ttft.series[0].x) == sorted(r["ttft_ms"] for r in result["requests"])
    assert tpot.series[0].y[-1] == 1.0


def test_cli_reports_an_unreachable_server(capsys):
    assert main(["--base-url", closed_port_url(), "--num-requests", "1"]) == 2
    assert "could not read the model name" in capsys.readouterr().err
