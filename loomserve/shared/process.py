"""Process plumbing shared by every loomserve process: logging, signals, parent death."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

_PR_SET_PDEATHSIG = 1


def setup_logging(name: str, level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("LOOMSERVE_LOG_LEVEL", "INFO")).upper(),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (no orphans after a
    supervisor crash). Called in the child right after fork, before exec."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def install_stop_handler(on_stop: Callable[[], None]) -> threading.Event:
    """SIGTERM and SIGINT set the returned event and call ``on_stop`` once."""
    stopped = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if not stopped.is_set():
            stopped.set()
            on_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stopped


def parent_watchdog(expected_parent: int, on_orphaned: Callable[[], None], interval_s: float = 1.0) -> None:
    """Backup for ``die_with_parent`` where prctl is unavailable or the parent was
    re-parented: a daemon thread polls getppid() and calls ``on_orphaned``."""
    if expected_parent <= 1:
        return

    def watch() -> None:
        while os.getppid() == expected_parent:
            threading.Event().wait(interval_s)
        on_orphaned()

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
