"""``loomserve serve``: start scheduler, worker and gateways as OS processes and watch them.

Children live in their own process group, so Ctrl-C reaches only the supervisor,
which then stops them in two groups: the front (the gateways, all at once with one
shared deadline, each draining its open streams while the scheduler and workers
still run), then the rest. Each child also gets SIGTERM from the kernel if the
supervisor dies (PR_SET_PDEATHSIG), and watches its parent pid as a backup.

A worker group that dies (a rank crashed, was killed, or failed a step) is
started again: the scheduler has already failed its in-flight requests and
answers 503 until every rank registers again. More than ``_MAX_RESTARTS``
restarts within ``_RESTART_WINDOW_S`` means it will not get better: then, as
when the scheduler or any gateway exits, the others are stopped and ``serve``
exits non-zero: no half-alive service, no orphans.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from loomserve.shared.process import die_with_parent, install_stop_handler

log = logging.getLogger(__name__)

_GRACE_S = 35.0  # the gateway's own graceful-shutdown timeout is 30 s
_KILL_AFTER_S = 10.0
_MAX_RESTARTS = 3
_RESTART_WINDOW_S = 600.0


@dataclass
class Child:
    """One process of the service. ``front`` children (the gateways) take the traffic: they
    are stopped first, so that they drain their streams while the engine behind them runs.
    ``env`` is added to the supervisor's environment for this child only."""

    name: str
    argv: list[str]
    restartable: bool = False
    front: bool = False
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)  # monotonic times

    def may_restart(self, now: float) -> bool:
        self.restarts = [t for t in self.restarts if now - t < _RESTART_WINDOW_S]
        return self.restartable and len(self.restarts) < _MAX_RESTARTS


class Supervisor:
    def __init__(self, children: list[Child], health_url: str) -> None:
        self.children = children
        self.health_url = health_url
        self._stop_requested = False

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **child.env, "LOOMSERVE_SUPERVISOR_PID": str(os.getpid()),
               "LOOMSERVE_PROCESS_NAME": child.name}
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "loomserve.cli", *child.argv],
            env=env,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def run(self) -> int:
        install_stop_handler(self._request_stop)
        for child in self.children:
            self._spawn(child)
        announced = False
        next_probe = time.monotonic()
        while True:
            # Checked before the stop flag, so a child that died just before a stop
            # request still makes the exit code say so.
            for child in self.children:
                assert child.proc is not None
                code = child.proc.poll()
                if code is None:
                    continue
                now = time.monotonic()
                if not self._stop_requested and child.may_restart(now):
                    child.restarts.append(now)
                    log.error("%s exited with code %d; starting it again (restart %d of at most %d in %.0f s)",
                              child.name, code, len(child.restarts), _MAX_RESTARTS, _RESTART_WINDOW_S)
                    self._spawn(child)
                    continue
                log.error("%s exited with code %d; stopping the others", child.name, code)
                self.shutdown()
                return 1
            if self._stop_requested:
                self.shutdown()
                return 0
            if not announced and time.monotonic() >= next_probe:
                announced = self._announce_when_ready()
                next_probe = time.monotonic() + 0.5
            time.sleep(0.1)

    def _request_stop(self) -> None:
        self._stop_requested = True

    def _announce_when_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as resp:
                info = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        base = self.health_url.rsplit("/", 1)[0]
        log.info("loomserve ready: %s/v1 serving %s on %s, %d KV blocks, max model length %d",
                 base, info["model"], info["device"], info["kv_blocks"], info["max_model_len"])
        return True

    def shutdown(self) -> None:
        """The front first (graceful drain), then everything else; kill what lingers."""
        self._stop_group([c for c in self.children if c.front], _GRACE_S)
        self._stop_group([c for c in self.children if not c.front], _KILL_AFTER_S)
        log.info("all processes stopped")

    @staticmethod
    def _stop_group(group: list[Child], timeout_s: float) -> None:
        """SIGTERM to every live child of ``group`` at once, then wait for all of them until
        one shared deadline: N gateways drain in parallel, not one after the other."""
        live = [c for c in group if c.proc is not None and c.proc.poll() is None]
        for child in live:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in live:
            assert child.proc is not None
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.name)
                child.proc.kill()
                child.proc.wait()
