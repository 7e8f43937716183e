"""The OS processes of a benchmark (servers, schedulers, workers): started, watched, stopped."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from bench.harness.metadata import REPO_ROOT
from loomserve.shared.process import die_with_parent

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 3000


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time of every thread of ``pid`` so far (schedstat: nanoseconds), None if unreadable."""
    total_ns = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total_ns += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total_ns / 1e9


class ProcessGroup:
    """The benchmark's OS processes, each logging to a file in one temporary directory.

    ``stop`` (also on leaving the ``with`` block) sends SIGTERM to all, kills what is still
    alive after a grace period and removes the directory. The children stop on their own
    if this process dies: the kernel sends them SIGTERM (PR_SET_PDEATHSIG) and their
    parent watchdog sees the pid go.
    """

    def __init__(self, profile_dir: Path | None = None) -> None:
        self.runtime = Path(tempfile.mkdtemp(prefix="loomserve-bench-"))
        self.profile_dir = profile_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def address(self, name: str) -> str:
        """An ipc address in the group's directory."""
        return f"ipc://{self.runtime}/{name}.sock"

    def spawn(self, name: str, module_argv: list[str], profile: bool = False) -> subprocess.Popen[bytes]:
        """Start ``python -m <module_argv>``, under cProfile into ``profile_dir/<name>.prof`` if asked."""
        prefix: list[str] = []
        if profile and self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            prefix = ["-m", "cProfile", "-o", str(self.profile_dir / f"{name}.prof")]
        log_file = (self.runtime / f"{name}.log").open("wb")
        self._logs[name] = log_file
        proc = subprocess.Popen(
            [sys.executable, *prefix, "-m", *module_argv],
            cwd=REPO_ROOT,
            env={**os.environ, "LOOMSERVE_SUPERVISOR_PID": str(os.getpid())},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        self.procs[name] = proc
        logger.info("started %s (pid %d)", name, proc.pid)
        return proc

    def log_tail(self, name: str) -> str:
        path = self.runtime / f"{name}.log"
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if path.exists() else ""

    def check_alive(self) -> None:
        """Raise, with its log tail, if any process has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")

    @contextlib.contextmanager
    def paused(self, name: str) -> Iterator[None]:
        """Stop process ``name`` (SIGSTOP) for the ``with`` block, then let it go on."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGCONT)

    def cpu_seconds(self) -> dict[str, float | None]:
        return {name: process_cpu_seconds(proc.pid) for name, proc in self.procs.items()}

    def stop(self) -> None:
        try:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for name, proc in self.procs.items():
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("%s (pid %d) did not stop in %.0f s; killing it", name, proc.pid, STOP_TIMEOUT_S)
                    proc.kill()
                    proc.wait()
        finally:
            for log_file in self._logs.values():
                log_file.close()
            self.procs.clear()
            self._logs.clear()
            shutil.rmtree(self.runtime, ignore_errors=True)
