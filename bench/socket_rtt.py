"""What one step's round trip between the scheduler and a worker process costs on this host,
beyond the step itself: a ZeroMQ ROUTER/DEALER ping-pong over ipc with messages of the size of
a 256-sequence plan (21 KB) and its result (10 KB), the "worker" busy for a step's length in
between as it is while it waits for the GPU.

    python -m bench.socket_rtt --out results/socket-rtt.json

Each case: the step length, and whether the scheduler side blocks in ``poll`` (as
``scheduler.server`` does) or spins on it; reported is the round trip minus the step (p50 and
p90 over ``--iterations``). A sleeping process wakes up later the longer it slept, which is
why the cost grows with the step.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import time
from typing import Any

import zmq

from bench.harness.cli import add_out, new_parser
from bench.harness.metadata import command_line, utc_timestamp
from bench.harness.results import write_json
from bench.harness.stats import percentile

PLAN_BYTES = 21_000
RESULT_BYTES = 10_000


def _worker(address: str, step_s: float) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    sock.send(b"ready")
    while True:
        frame = sock.recv()
        if frame == b"stop":
            break
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:  # busy, as a worker is in a CUDA synchronisation
            pass
        sock.send(b"r" * RESULT_BYTES)
    sock.close(linger=0)
    ctx.term()


def round_trips(step_s: float, spin: bool, iterations: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loomserve-rtt-") as runtime:
        address = f"ipc://{runtime}/rtt.sock"
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(address)
        proc = mp.get_context("spawn").Process(target=_worker, args=(address, step_s))
        proc.start()
        try:
            routing_id, _ = router.recv_multipart()
            extra_us = []
            for _ in range(iterations):
                begin = time.perf_counter()
                router.send_multipart([routing_id, b"p" * PLAN_BYTES])
                if spin:
                    while not router.poll(0):
                        pass
                router.recv_multipart()
                extra_us.append((time.perf_counter() - begin - step_s) * 1e6)
            router.send_multipart([routing_id, b"stop"])
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
            router.close(linger=0)
            ctx.term()
    return {"step_ms": step_s * 1000, "scheduler_spins": spin, "iterations": iterations,
            "p50_us": percentile(extra_us, 50), "p90_us": percentile(extra_us, 90, method="lower")}


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("bench.socket_rtt", __doc__)
    add_out(parser, help=None)
    parser.add_argument("--steps-ms", type=float, nargs="+", default=[3.0, 14.0, 35.0])
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args(argv)
    cases = [round_trips(step / 1000, spin, args.iterations) for step in args.steps_ms for spin in (False, True)]
    result = {"command": command_line("bench.socket_rtt", argv), "date": utc_timestamp(), "cases": cases}
    write_json(args.out, result)
    for c in cases:
        print(f"step {c['step_ms']:.0f} ms, scheduler {'spins' if c['scheduler_spins'] else 'blocks in poll'}: "
              f"{c['p50_us']:.0f} us p50, {c['p90_us']:.0f} us p90 beyond the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
