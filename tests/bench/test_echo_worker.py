"""The echo worker as a real process: with the real scheduler, alone against bad plans, and
the scheduler cost benchmark built on it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bench import scheduler_cost
from bench.echo_worker import DEFAULT_TOKEN_ID, EchoConfig, EchoRunner, PlanError
from bench.harness.processes import ProcessGroup
from bench.harness.stacks import BackendOptions, start_backend
from bench.scheduler_cost import GatewaySocket, run_to_length
from loomserve.shared import messages as m


@pytest.fixture
def group() -> Iterator[ProcessGroup]:
    with ProcessGroup() as processes:
        yield processes


def test_every_request_finishes_with_max_tokens(group: ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    # DEBUG makes the scheduler log each preemption, which the assertions below look for.
    monkeypatch.setenv("LOOMSERVE_LOG_LEVEL", "DEBUG")
    # 16 blocks of 16 tokens for four sequences of up to 80 tokens (5 blocks each): running
    # together they outgrow the cache, so some are preempted and resumed. A budget of 32
    # tokens splits every prompt longer than that across steps.
    options = BackendOptions(max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=16, max_model_len=256)
    client = GatewaySocket(start_backend(group, options))
    try:
        client.wait_ready(group)
        shared_prompt = list(range(100, 140))
        requests = [
            m.AddRequest(f"long-{i}", [1000 + i] * 20, run_to_length(60), time.time()) for i in range(4)
        ] + [
            # the same 40-token prompt twice: the second finds the first's full blocks cached
            m.AddRequest("shared-a", shared_prompt, run_to_length(8), time.time()),
            m.AddRequest("shared-b", shared_prompt, run_to_length(9), time.time()),
            m.AddRequest("one-token-prompt", [7], run_to_length(3), time.time()),
            m.AddRequest("one-token-output", list(range(50)), run_to_length(1), time.time()),
            # parallel sampling: a fork with a copied partial block, and one at admission
            m.AddRequest("parallel", list(range(200, 230)), run_to_length(10), time.time(), n=3),
            m.AddRequest("parallel-one-token", [9], run_to_length(4), time.time(), n=2),
        ]
        outputs = {i: r for r in requests for i in m.choice_request_ids(r.request_id, r.n)}
        # All of them in the scheduler before the first step ends, however busy the host.
        with group.paused("echo-worker"):
            for request in requests:
                client.send(request)
            client.status()

        tokens: dict[str, list[int]] = {output_id: [] for output_id in outputs}
        reasons: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(reasons) < len(outputs):
            assert time.monotonic() < deadline, f"unfinished after 30 s: {set(tokens) - set(reasons)}"
            msg = client.recv(1.0)
            if not isinstance(msg, m.RequestOutputs):
                group.check_alive()
                continue
            for out in msg.outputs:
                assert out.error is None, out.error
                assert out.request_id not in reasons, f"{out.request_id} got output after it finished"
                tokens[out.request_id] += out.new_token_ids
                if out.finish_reason is not None:
                    reasons[out.request_id] = out.finish_reason

        for output_id, request in outputs.items():
            assert reasons[output_id] == "length"
            assert tokens[output_id] == [DEFAULT_TOKEN_ID] * request.sampling.max_tokens
        status = client.wait_idle(group)
        assert status.workers_ready and status.error is None
        assert status.num_forks == 2 and status.num_block_copies == 2
        group.check_alive()
        scheduler_log = (group.runtime / "scheduler.log").read_text()
        assert "preempted" in scheduler_log
        assert "worker group down" not in scheduler_log
    finally:
        client.close()


def test_a_bad_plan_is_reported_and_the_worker_registers_again(group: ProcessGroup) -> None:
    ctx = zmq.Context()
    scheduler = ctx.socket(zmq.ROUTER)
    scheduler.setsockopt(zmq.LINGER, 0)
    address = group.address("worker")
    scheduler.bind(address)
    encoder = m.encoder()

    def receive() -> tuple[bytes, m.WorkerToScheduler]:
        assert scheduler.poll(20_000), "the echo worker sent nothing"
        routing_id, frame = scheduler.recv_multipart()
        return routing_id, m.worker_to_scheduler.decode(frame)

    try:
        group.spawn("echo-worker", ["bench.echo_worker", "--scheduler-address", address, "--num-kv-blocks", "8"])
        routing_id, ready = receive()
        assert isinstance(ready, m.WorkerReady) and ready.num_kv_blocks == 8 and ready.block_size == 16

        new = m.NewRequestData("a", [1, 2, 3], run_to_length(4), block_ids=[0], num_computed_tokens=0)
        scheduler.send_multipart([routing_id, encoder.encode(m.BatchPlan(1, [new], num_scheduled_tokens={"a": 3}))])
        _, result = receive()
        assert isinstance(result, m.StepResult)
        assert (result.step_id, result.request_ids, result.sampled_token_ids) == (1, ["a"], [[DEFAULT_TOKEN_ID]])

        unknown = m.CachedRequestData("ghost", [], 3)
        plan = m.BatchPlan(2, cached_requests=[unknown], num_scheduled_tokens={"ghost": 1})
        scheduler.send_multipart([routing_id, encoder.encode(plan)])
        _, failure = receive()
        assert isinstance(failure, m.WorkerFailure) and "ghost" in failure.message
        _, again = receive()
        assert isinstance(again, m.WorkerReady)
    finally:
        scheduler.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (m.BatchPlan(2, num_scheduled_tokens={"a": 1}), "without new or cached data"),
        (m.BatchPlan(2, cached_requests=[m.CachedRequestData("a", [], 2)], num_scheduled_tokens={"a": 1}),
         "the last step left 3"),
        (m.BatchPlan(2, cached_requests=[m.CachedRequestData("a", [], 3)], num_scheduled_tokens={"a": 2}),
         "4 known"),
        (m.BatchPlan(2, cached_requests=[m.CachedRequestData("a", [9], 3)], num_scheduled_tokens={"a": 1}),
         "outside the KV cache"),
        (m.BatchPlan(2, finished_request_ids=["b"]), "not known"),
        (m.BatchPlan(2, new_requests=[m.NewRequestData("a", [1, 2], run_to_length(4), [1], 0)],
                     num_scheduled_tokens={"a": 2}), "other tokens"),
        (m.BatchPlan(2, new_requests=[m.NewRequestData("b", [5] * 20, run_to_length(4), [1, 0], 16)],
                     cached_requests=[m.CachedRequestData("a", [], 3)],
                     num_scheduled_tokens={"a": 1, "b": 4}), "both write into block 0"),
    ],
)
def test_echo_runner_rejects_plans_the_scheduler_must_not_send(plan: m.BatchPlan, message: str) -> None:
    runner = EchoRunner(EchoConfig(num_kv_blocks=8))
    first = m.NewRequestData("a", [1, 2, 3], run_to_length(4), block_ids=[0], num_computed_tokens=0)
    runner.execute(m.BatchPlan(1, [first], num_scheduled_tokens={"a": 3}))
    with pytest.raises(PlanError, match=message):
        runner.execute(plan)


def test_echo_runner_avoids_stop_tokens_unless_asked() -> None:
    sampling = m.SamplingParams(max_tokens=8, stop_token_ids=[DEFAULT_TOKEN_ID])
    runner = EchoRunner(EchoConfig(num_kv_blocks=8, stop_after=2))
    plan = m.BatchPlan(1, [m.NewRequestData("a", [1], sampling, [0], 0)], num_scheduled_tokens={"a": 1})
    sampled = [runner.execute(plan).sampled_token_ids]
    for step in (2, 3):
        computed = runner.states["a"].num_computed_tokens
        plan = m.BatchPlan(step, cached_requests=[m.CachedRequestData("a", [], computed)],
                           num_scheduled_tokens={"a": 1})
        sampled.append(runner.execute(plan).sampled_token_ids)
    assert sampled == [[[DEFAULT_TOKEN_ID + 1]], [[DEFAULT_TOKEN_ID + 1]], [[DEFAULT_TOKEN_ID]]]


def test_scheduler_cost_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "scheduler-cost.json"
    code = scheduler_cost.main(["--seqs", "1", "4", "--steps", "30", "--warmup-steps", "3", "--prompt-len", "20",
                                "--profile-steps", "10", "--top", "5", "--output-json", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["schema"] == scheduler_cost.RESULT_SCHEMA
    results = report["results"]
    assert [r["num_seqs"] for r in results] == [1, 4]
    for result in results:
        assert result["steps"] == 30 and result["irregular_steps"] == 0
        assert result["tokens_per_s"] == pytest.approx(result["num_seqs"] * result["steps_per_s"])
        assert result["step_us_p50"] > 0
        assert result["in_process"]["scheduler_total_us"] > 0
        assert len(result["in_process"]["profile_top_tottime"]) == 5
    assert "step µs p50" in capsys.readouterr().out
    # Its chart, from the report just written: step times and throughput against the sequences.
    assert output.with_suffix(".png").stat().st_size > 0
    step, tokens = scheduler_cost.figure(report).panels
    assert [s.label for s in step.series] == ["step p50", "step p95", "scheduler CPU", "echo worker CPU",
                                              "scheduler in process, p50"]
    assert step.series[0].x == (1, 4) and step.xticks == (1, 4)
    assert tokens.series[0].y == tuple(r["tokens_per_s"] for r in results)
