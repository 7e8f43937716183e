"""A group of real OS processes: logs, CPU time, liveness, pause and stop."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.harness.processes import ProcessGroup, process_cpu_seconds

# `python -m timeit` runs a statement: a process that prints, works, or waits, as asked.
SLEEPER = ["timeit", "-n", "1", "-r", "1", "print('up', flush=True); import time; time.sleep(60)"]


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_cpu_seconds_of_a_live_and_of_no_process() -> None:
    assert (process_cpu_seconds(os.getpid()) or 0.0) > 0.0
    assert process_cpu_seconds(2**22 + 12345) is None  # above the kernel's pid limit


def test_a_group_runs_logs_pauses_and_stops() -> None:
    with ProcessGroup() as group:
        proc = group.spawn("sleeper", SLEEPER)
        runtime = group.runtime
        assert group.address("x") == f"ipc://{runtime}/x.sock"
        wait_for(lambda: "up" in group.log_tail("sleeper"))
        group.check_alive()
        with group.paused("sleeper"):
            wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "T")  # stopped
        assert isinstance(group.cpu_seconds()["sleeper"], float)
    assert proc.poll() is not None  # SIGTERM on leaving the block
    assert not runtime.exists() and group.procs == {}


def test_an_exited_process_is_reported_with_its_log() -> None:
    with ProcessGroup() as group:
        group.spawn("quitter", ["timeit", "-n", "1", "-r", "1", "print('bye', flush=True); 1 / 0"])
        group.procs["quitter"].wait(20)
        with pytest.raises(RuntimeError, match=r"quitter exited with code 1:\nbye\n(.|\n)*ZeroDivisionError"):
            group.check_alive()
