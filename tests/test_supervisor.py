"""The supervisor's shutdown order, on real processes: every front child (gateway) gets
SIGTERM at once and drains, then the rest are stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loomserve.supervisor import Child, Supervisor

# A child that takes ``drain_s`` to stop after SIGTERM, and writes down when it got it and when it left.
_CHILD = """
import signal, sys, time
name, drain_s, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def stop(signum, frame):
    with open(log, "a") as f:
        f.write(f"{name} term {time.monotonic()}\\n")
    time.sleep(drain_s)
    with open(log, "a") as f:
        f.write(f"{name} exit {time.monotonic()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def _start(name: str, drain_s: float, log: Path, front: bool = False) -> Child:
    child = Child(name, [], front=front)
    child.proc = subprocess.Popen([sys.executable, "-c", _CHILD, name, str(drain_s), str(log)],
                                  stdout=subprocess.PIPE)
    return child


def test_gateways_drain_together_before_the_engine_stops(tmp_path: Path) -> None:
    log = tmp_path / "events"
    children = [_start("scheduler", 0.0, log), _start("worker", 0.0, log),
                _start("gateway-1", 0.6, log, front=True), _start("gateway-2", 0.3, log, front=True)]
    for child in children:
        assert child.proc is not None and child.proc.stdout is not None
        assert child.proc.stdout.readline() == b"ready\n"  # its SIGTERM handler is in place
    Supervisor(children, "http://127.0.0.1:9/health").shutdown()
    events = {}
    for line in log.read_text().splitlines():
        name, what, at = line.split()
        events[name, what] = float(at)
    # Both gateways got SIGTERM before either had finished draining: at once, not in turn.
    assert events["gateway-2", "term"] < events["gateway-1", "exit"]
    assert events["gateway-1", "term"] < events["gateway-2", "exit"]
    # The engine keeps running until the last gateway has drained.
    last_gateway = max(events["gateway-1", "exit"], events["gateway-2", "exit"])
    assert min(events["scheduler", "term"], events["worker", "term"]) > last_gateway
    for child in children:
        assert child.proc is not None and child.proc.returncode == 0
