"""What one scheduler step costs, with the model taken out.

A real scheduler process (``python -m loomserve.cli scheduler``) and the echo worker
(``bench/echo_worker.py``, no model: it answers each plan at once) run on ipc sockets in
a temporary directory; this process is the gateway, speaking ``AddRequest`` /
``RequestOutputs`` on a DEALER socket. For each size N it submits N requests (random
prompts of ``--prompt-len`` tokens, EOS ignored, ``max_tokens`` long enough that none
ends during the run), waits until all N decode, skips ``--warmup-steps`` and then times
``--steps`` steps. Every step then produces exactly one ``RequestOutputs`` with N tokens,
so the gaps between their arrivals are the step times. They are timed where this process
receives them: if it loses the CPU for a while, a long gap and then a burst of short ones
show it (steps/s over the whole window is not affected).

| figure              | meaning                                                                       |
|---------------------|-------------------------------------------------------------------------------|
| step µs p50/p95/max | gaps between consecutive RequestOutputs: one whole step, scheduler + sockets  |
|                     | + echo worker, as the gateway sees it                                         |
| steps/s, tokens/s   | steps and tokens of the timed window over its wall time                       |
| sched CPU µs/step   | CPU time of the scheduler process (all threads, ZeroMQ's included) per step   |
| worker CPU µs/step  | the same for the echo worker (its plan checks, decode and encode)            |
| in-process µs/step  | the same plans without processes: ``Scheduler.schedule`` + msgpack encode of  |
|                     | the plan + decode of the result + ``update_from_output`` + encode of the      |
|                     | outputs, p50 of each; with ``--profile-steps``, a cProfile of those phases    |

The machine's load (``os.getloadavg``) is recorded beside each size: a busy host
stretches wall times, while CPU times per step move much less.

    python -m bench.scheduler_cost --seqs 1 16 64 256 --output-json results/scheduler-cost.json

``--profile-dir DIR`` also runs the scheduler process under cProfile and prints where
its time went (the process loop and sockets included), at the price of slower steps.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import math
import os
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.echo_worker import BLOCK_SIZE, EchoConfig, EchoRunner
from bench.harness import plots
from bench.harness.cli import add_output_json, new_parser, setup_logging
from bench.harness.metadata import command_line, run_metadata
from bench.harness.processes import ProcessGroup
from bench.harness.profiles import format_top, profile_file_summary, top_functions
from bench.harness.results import write_chart, write_json
from bench.harness.stacks import BackendOptions, start_backend
from bench.workloads import random_prompts
from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.request import Request
from loomserve.scheduler.scheduler import Scheduler
from loomserve.shared import messages as m
from loomserve.shared.config import SchedulerConfig

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "loomserve.bench.scheduler_cost/1"
DEFAULT_SEQS = (1, 16, 64, 256)


class GatewaySocket:
    """The gateway's side of the scheduler, spoken directly (as gateway/engine_client.py does)."""

    def __init__(self, address: str) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        self._encoder = m.encoder()
        self._nonce = 0

    def send(self, msg: m.AddRequest | m.AbortRequest | m.StatusQuery) -> None:
        self._sock.send(self._encoder.encode(msg))

    def recv(self, timeout_s: float) -> m.SchedulerToGateway | None:
        """The next message from the scheduler, or None after ``timeout_s``."""
        if not self._sock.poll(int(timeout_s * 1000)):
            return None
        return m.scheduler_to_gateway.decode(self._sock.recv())

    def status(self, timeout_s: float = 5.0) -> m.SchedulerStatus:
        """Ask for the scheduler's status; outputs that arrive meanwhile are dropped."""
        self._nonce += 1
        self.send(m.StatusQuery(self._nonce))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if isinstance(msg, m.SchedulerStatus) and msg.nonce == self._nonce:
                return msg
        raise TimeoutError(f"the scheduler did not answer a status query in {timeout_s:g} s")

    def wait_until(self, done: Callable[[m.SchedulerStatus], bool], group: ProcessGroup, timeout_s: float,
                   what: str) -> m.SchedulerStatus:
        deadline = time.monotonic() + timeout_s
        while True:
            group.check_alive()
            try:
                status = self.status(timeout_s=1.0)
                if done(status):
                    return status
            except TimeoutError:
                status = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"the scheduler was not {what} after {timeout_s:g} s: {status}")
            time.sleep(0.05)

    def wait_ready(self, group: ProcessGroup, timeout_s: float = 60.0) -> m.SchedulerStatus:
        return self.wait_until(lambda s: s.workers_ready, group, timeout_s, "ready")

    def wait_idle(self, group: ProcessGroup, timeout_s: float = 30.0) -> m.SchedulerStatus:
        return self.wait_until(
            lambda s: s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks,
            group, timeout_s, "idle")

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


def run_to_length(max_tokens: int) -> m.SamplingParams:
    """Greedy, and no stop tokens (EOS ignored): the request runs to ``max_tokens``."""
    return m.SamplingParams(max_tokens=max_tokens, temperature=0.0)


# -- the process measurement -----------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    prompt_len: int = 128
    steps: int = 3000
    warmup_steps: int = 100
    profile_steps: int = 500  # in-process steps under cProfile, after the timed ones
    max_num_batched_tokens: int = 2048
    seed: int = 0
    step_timeout_s: float = 30.0  # no RequestOutputs for this long fails the run

    def max_tokens(self, num_seqs: int) -> int:
        """Enough output tokens that no request of a run of ``num_seqs`` ends before the timing does.

        The first request starts decoding after its own prefill, the last one after
        everyone's; the margin covers the steps that only prefill.
        """
        prefill_steps = math.ceil(num_seqs * self.prompt_len / self.max_num_batched_tokens)
        return prefill_steps + self.warmup_steps + self.steps + self.profile_steps + 2 * BLOCK_SIZE

    def backend(self, max_seqs: int) -> BackendOptions:
        max_len = self.prompt_len + self.max_tokens(max_seqs)
        blocks_per_seq = math.ceil(max_len / BLOCK_SIZE)
        return BackendOptions(
            max_num_seqs=max_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            num_kv_blocks=max_seqs * blocks_per_seq + BLOCK_SIZE,
            max_model_len=blocks_per_seq * BLOCK_SIZE,
        )


@dataclass
class PhaseCost:
    """In-process microseconds per step, p50 over the timed steps."""

    schedule_us: float
    encode_plan_us: float
    decode_result_us: float
    update_us: float
    encode_outputs_us: float
    scheduler_total_us: float  # the five above, summed per step (p50 of the sums)
    echo_worker_us: float  # decode of the plan, EchoRunner.execute, encode of the result
    profile_top_tottime: list[dict[str, Any]] = field(default_factory=list)
    profile_top_cumtime: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepCost:
    num_seqs: int
    steps: int
    duration_s: float
    step_us_p50: float
    step_us_p95: float
    step_us_max: float
    step_us_mean: float
    steps_per_s: float
    tokens_per_s: float
    irregular_steps: int  # timed steps whose output was not one token for each sequence
    scheduler_cpu_us_per_step: float | None
    worker_cpu_us_per_step: float | None
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    in_process: PhaseCost | None = None


def measure_processes(client: GatewaySocket, group: ProcessGroup, num_seqs: int, options: RunOptions) -> StepCost:
    """Run ``num_seqs`` sequences through the real processes and time ``options.steps`` steps."""
    loadavg_before = os.getloadavg()
    max_tokens = options.max_tokens(num_seqs)
    prompts = random_prompts(num_seqs, options.prompt_len, options.seed + num_seqs)
    request_ids = [f"n{num_seqs}-{i}" for i in range(num_seqs)]
    # On a busy host this process can lose the CPU between two sends while the scheduler
    # runs the requests already sent, hundreds of steps ahead. With the worker stopped the
    # scheduler gets at most one step ahead: the requests that arrive meanwhile join the next.
    with group.paused("echo-worker"):
        for request_id, prompt in zip(request_ids, prompts, strict=True):
            client.send(m.AddRequest(request_id, prompt, run_to_length(max_tokens), time.time()))
        client.status()  # answered after every request above is in the scheduler

    started: set[str] = set()
    start_skew = 0  # outputs from the first request's first token to the last one's
    warmup_left = options.warmup_steps
    times: list[float] = []
    tokens = irregular = 0
    cpu_start: dict[str, float | None] = {}
    try:
        while len(times) <= options.steps:
            msg = client.recv(options.step_timeout_s)
            now = time.perf_counter()
            if msg is None:
                group.check_alive()
                raise TimeoutError(f"no output for {options.step_timeout_s:g} s with {num_seqs} sequences")
            if not isinstance(msg, m.RequestOutputs):
                continue
            for out in msg.outputs:
                if out.finish_reason is not None:
                    raise RuntimeError(
                        f"request {out.request_id} ended ({out.finish_reason}, {out.error}) before the timed steps "
                        f"did; the requests started {start_skew} steps apart (or more, if still starting)"
                        f"\n{group.log_tail('scheduler')}\n{group.log_tail('echo-worker')}")
            if len(started) < num_seqs:
                start_skew += bool(started)
                started.update(out.request_id for out in msg.outputs)
                continue
            if warmup_left > 0:
                warmup_left -= 1
                continue
            if not times:
                cpu_start = group.cpu_seconds()
            else:
                num_tokens = sum(len(out.new_token_ids) for out in msg.outputs)
                tokens += num_tokens
                irregular += num_tokens != num_seqs or len(msg.outputs) != num_seqs
            times.append(now)
        cpu_end = group.cpu_seconds()
    finally:
        client.send(m.AbortRequest(request_ids))
    client.wait_idle(group)

    gaps_us = np.diff(np.asarray(times)) * 1e6
    duration = times[-1] - times[0]
    steps = len(gaps_us)

    def cpu_us_per_step(name: str) -> float | None:
        begin, end = cpu_start.get(name), cpu_end.get(name)
        return None if begin is None or end is None else (end - begin) * 1e6 / steps

    p50, p95 = np.percentile(gaps_us, [50, 95])
    return StepCost(
        num_seqs=num_seqs,
        steps=steps,
        duration_s=duration,
        step_us_p50=float(p50),
        step_us_p95=float(p95),
        step_us_max=float(gaps_us.max()),
        step_us_mean=float(gaps_us.mean()),
        steps_per_s=steps / duration,
        tokens_per_s=tokens / duration,
        irregular_steps=irregular,
        scheduler_cpu_us_per_step=cpu_us_per_step("scheduler"),
        worker_cpu_us_per_step=cpu_us_per_step("echo-worker"),
        loadavg_before=loadavg_before,
        loadavg_after=os.getloadavg(),
    )


# -- the in-process measurement ----------------------------------------------------


_PHASES = ("schedule", "encode_plan", "echo_worker", "decode_result", "update", "encode_outputs")


class _InProcessEngine:
    """Scheduler and echo runner in one process, the plan and result going through msgpack
    as they would on the sockets."""

    def __init__(self, num_seqs: int, options: RunOptions) -> None:
        backend = options.backend(num_seqs)
        config = SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=options.max_num_batched_tokens)
        kv_cache = KVCacheManager(backend.num_kv_blocks, BLOCK_SIZE, enable_prefix_caching=True)
        self.scheduler = Scheduler(config, kv_cache, backend.max_model_len)
        self.runner = EchoRunner(EchoConfig(num_kv_blocks=backend.num_kv_blocks, max_model_len=backend.max_model_len))
        self.encoder = m.encoder()
        max_tokens = options.max_tokens(num_seqs)
        prompts = random_prompts(num_seqs, options.prompt_len, options.seed + num_seqs)
        for i, prompt in enumerate(prompts):
            self.scheduler.add_request(Request(f"n{num_seqs}-{i}", prompt, run_to_length(max_tokens)))
        self.num_seqs = num_seqs

    def step(self, profiler: cProfile.Profile | None = None) -> tuple[list[float], int]:
        """One step; returns the seconds of each phase and the number of outputs.

        A profiler is enabled only around the scheduler's phases, not the echo worker's.
        """
        clock = time.perf_counter
        t0 = clock()
        if profiler:
            profiler.enable()
        plan = self.scheduler.schedule()
        t1 = clock()
        payload = self.encoder.encode(plan)
        t2 = clock()
        if profiler:
            profiler.disable()
        if plan is None:
            raise RuntimeError("the scheduler has nothing to run")
        wire_plan = m.scheduler_to_worker.decode(payload)
        assert isinstance(wire_plan, m.BatchPlan)
        result_frame = self.encoder.encode(self.runner.execute(wire_plan))
        t3 = clock()
        if profiler:
            profiler.enable()
        result = m.worker_to_scheduler.decode(result_frame)
        assert isinstance(result, m.StepResult)
        t4 = clock()
        outputs = self.scheduler.update_from_output(result)
        t5 = clock()
        self.encoder.encode(m.RequestOutputs(outputs))
        t6 = clock()
        if profiler:
            profiler.disable()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5], len(outputs)


def measure_in_process(num_seqs: int, options: RunOptions, top: int) -> PhaseCost:
    """The same plans as the process run, timed phase by phase without sockets; then cProfile."""
    engine = _InProcessEngine(num_seqs, options)
    while engine.step()[1] < num_seqs:
        pass
    for _ in range(options.warmup_steps):
        engine.step()
    samples = np.asarray([engine.step()[0] for _ in range(options.steps)]) * 1e6  # (steps, phases) µs
    p50 = dict(zip(_PHASES, np.percentile(samples, 50, axis=0).tolist(), strict=True))
    scheduler_columns = [i for i, phase in enumerate(_PHASES) if phase != "echo_worker"]
    cost = PhaseCost(
        schedule_us=p50["schedule"],
        encode_plan_us=p50["encode_plan"],
        decode_result_us=p50["decode_result"],
        update_us=p50["update"],
        encode_outputs_us=p50["encode_outputs"],
        scheduler_total_us=float(np.percentile(samples[:, scheduler_columns].sum(axis=1), 50)),
        echo_worker_us=p50["echo_worker"],
    )
    if options.profile_steps > 0:
        profiler = cProfile.Profile()
        for _ in range(options.profile_steps):
            engine.step(profiler)
        stats = pstats.Stats(profiler)
        cost.profile_top_tottime = top_functions(stats, "tottime", options.profile_steps, top)
        cost.profile_top_cumtime = top_functions(stats, "cumulative", options.profile_steps, top)
    return cost


# -- reports --------------------------------------------------------------------------


def format_table(results: list[StepCost]) -> str:
    def num(value: float | None, digits: int = 0) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    header = (f"{'seqs':>5} {'steps':>6} | {'step µs p50':>11} {'p95':>7} {'max':>7} | {'steps/s':>8} "
              f"{'tokens/s':>9} | {'sched CPU':>9} {'worker CPU':>10} | {'in-proc sched':>13} {'echo':>6} | load")
    lines = [header, "-" * len(header)]
    for r in results:
        ip = r.in_process
        lines.append(
            f"{r.num_seqs:>5} {r.steps:>6} | {r.step_us_p50:>11.0f} {r.step_us_p95:>7.0f} {r.step_us_max:>7.0f} | "
            f"{r.steps_per_s:>8.0f} {r.tokens_per_s:>9.0f} | {num(r.scheduler_cpu_us_per_step):>9} "
            f"{num(r.worker_cpu_us_per_step):>10} | {num(ip.scheduler_total_us if ip else None):>13} "
            f"{num(ip.echo_worker_us if ip else None):>6} | {r.loadavg_before[0]:.2f}"
        )
    lines.append("(CPU columns: µs of CPU per step; in-proc: µs per step without sockets, p50; load: 1-min average)")
    phased = [r for r in results if r.in_process]
    if phased:
        lines.append("")
        lines.append(f"{'seqs':>5} | {'schedule':>9} {'enc plan':>9} {'dec result':>10} {'update':>8} "
                     f"{'enc outputs':>11}   (in-process µs per step, p50)")
        for r in phased:
            ip = r.in_process
            assert ip is not None
            lines.append(f"{r.num_seqs:>5} | {ip.schedule_us:>9.0f} {ip.encode_plan_us:>9.0f} "
                         f"{ip.decode_result_us:>10.0f} {ip.update_us:>8.0f} {ip.encode_outputs_us:>11.0f}")
    return "\n".join(lines)


def figure(report: dict[str, Any]) -> plots.Chart:
    """Step time and throughput against the number of running sequences."""
    rows = report["results"]
    seqs = tuple(r["num_seqs"] for r in rows)

    def curve(label: str, values: list[float | None]) -> plots.Series:
        return plots.series(label, list(zip(seqs, values, strict=True)))

    in_process = [r["in_process"]["scheduler_total_us"] if r["in_process"] else None for r in rows]
    step = plots.Panel("one step, as the gateway sees it", "running sequences", "µs per step", (
        curve("step p50", [r["step_us_p50"] for r in rows]),
        curve("step p95", [r["step_us_p95"] for r in rows]),
        curve("scheduler CPU", [r["scheduler_cpu_us_per_step"] for r in rows]),
        curve("echo worker CPU", [r["worker_cpu_us_per_step"] for r in rows]),
        curve("scheduler in process, p50", in_process),
    ), logx=plots.wide(seqs), xticks=seqs)
    tokens = plots.Panel("tokens out of the scheduler", "running sequences", "tokens/s",
                         (curve("tokens/s", [r["tokens_per_s"] for r in rows]),), logx=plots.wide(seqs), xticks=seqs)
    return plots.Chart(f"Scheduler cost per step ({report['metadata']['date']})", (step, tokens))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = new_parser("bench.scheduler_cost", "Microseconds per scheduler step, with an echo worker.")
    parser.add_argument("--seqs", type=int, nargs="+", default=list(DEFAULT_SEQS),
                        help="running sequences to measure (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=RunOptions.prompt_len,
                        help="prompt tokens (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=RunOptions.steps,
                        help="timed steps per size (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=RunOptions.warmup_steps,
                        help="untimed decode steps first (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=RunOptions.max_num_batched_tokens,
                        help="the scheduler's token budget (default: %(default)s)")
    parser.add_argument("--profile-steps", type=int, default=RunOptions.profile_steps,
                        help="steps to cProfile in process per size, 0 for none (default: %(default)s)")
    parser.add_argument("--no-in-process", dest="in_process", action="store_false",
                        help="skip the in-process timing and profile")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile (default: %(default)s)")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="also run the scheduler process under cProfile, writing scheduler.prof here")
    parser.add_argument("--seed", type=int, default=0)
    add_output_json(parser)
    args = parser.parse_args(argv)
    if min(args.seqs) < 1 or args.steps < 2 or args.prompt_len < 1 or args.warmup_steps < 0:
        parser.error("--seqs, --prompt-len and --steps must be positive (--steps at least 2)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    setup_logging()
    options = RunOptions(prompt_len=args.prompt_len, steps=args.steps, warmup_steps=args.warmup_steps,
                         profile_steps=args.profile_steps if args.in_process else 0,
                         max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    metadata = {**run_metadata(command_line("bench.scheduler_cost", argv)), "cpu_count": os.cpu_count()}
    results: list[StepCost] = []
    with ProcessGroup(args.profile_dir) as group:
        client = GatewaySocket(start_backend(group, options.backend(max(args.seqs))))
        try:
            client.wait_ready(group)
            for num_seqs in args.seqs:
                logger.info("timing %d steps with %d running sequences", options.steps, num_seqs)
                results.append(measure_processes(client, group, num_seqs, options))
        finally:
            client.close()
    process_profile = None
    if args.profile_dir is not None:
        total_steps = sum(r.steps for r in results)
        process_profile = profile_file_summary(args.profile_dir / "scheduler.prof", total_steps,
                                               "step (timed steps only; start-up and warm-up included)", args.top)
    if args.in_process:
        for result in results:
            logger.info("in-process timing with %d sequences", result.num_seqs)
            result.in_process = measure_in_process(result.num_seqs, options, args.top)

    print(format_table(results))
    for result in results:
        if result.in_process and result.in_process.profile_top_tottime:
            print(f"\nin-process cProfile, {result.num_seqs} sequences, scheduler side only, by own time:")
            print(format_top(result.in_process.profile_top_tottime, "step"))
    if process_profile is not None:
        print(f"\nscheduler process cProfile ({process_profile['path']}), by own time:")
        print(format_top(process_profile["top_tottime"], "timed step"))
    if args.output_json is not None:
        report = {
            "schema": RESULT_SCHEMA,
            "metadata": metadata,
            "options": asdict(options),
            "results": [asdict(r) for r in results],
            "scheduler_process_profile": process_profile,
        }
        write_json(args.output_json, report)
        write_chart(args.output_json, figure(report))
        print(f"\nresults written to {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
