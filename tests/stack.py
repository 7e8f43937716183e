"""Runs a real ``loomserve serve`` (three OS processes over ZeroMQ) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children of children too), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_mid_stream(base_url: str, pid: int, max_tokens: int) -> tuple[list[str], float]:
    """Stream a long completion, SIGKILL ``pid`` after its third chunk; return the stream's
    data lines and the seconds from the kill to the end of the stream."""
    import httpx

    lines: list[str] = []
    killed_at = 0.0
    with httpx.stream("POST", base_url + "/v1/completions", timeout=60,
                      json={"prompt": "Tell me a story.", "max_tokens": max_tokens, "ignore_eos": True,
                            "stream": True}) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line[6:])
            if len(lines) == 3:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
    return lines, time.monotonic() - killed_at


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class ServeStack:
    """``loomserve serve`` on a free port; ``stop()`` checks that no process is left.
    ``command`` runs loomserve (default: this interpreter's ``-m loomserve.cli``)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log_path: Path | None = None,
                 command: list[str] | None = None, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        out = log_path.open("wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "loomserve.cli"]), "serve", "--port", str(self.port), *args],
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.child_pids: list[int] = []

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loomserve serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                status, _ = self.get("/health", timeout=2)
                if status == 200:
                    self.child_pids = descendants(self.proc.pid)
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"loomserve did not become ready in {timeout} s: {self.log_tail()}")

    def wait_unhealthy(self, timeout: float = 3.0) -> dict[str, Any]:
        """Wait for /health to answer 503 (the gateway polls the scheduler each second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, info = self.get("/health")
            if status == 503:
                return info
            time.sleep(0.05)
        raise AssertionError(f"/health did not turn unhealthy in {timeout} s")

    def log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def child_pid(self, role: str) -> int:
        for pid in self.child_pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if len(cmdline) > 3 and cmdline[3].decode() == role:
                return pid
        raise LookupError(f"no {role} process under the supervisor")

    def wait_idle(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until no request is queued or running and every KV block is free."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _, info = self.get("/health")
            if (info.get("num_running") == 0 and info.get("num_waiting") == 0
                    and info.get("kv_blocks_free") == info.get("kv_blocks")):
                return info
            time.sleep(0.1)
        raise AssertionError(f"engine not empty after {timeout} s: {info}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in self.child_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        stray = [p for p in self.child_pids if pid_alive(p)]
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        assert not stray, f"processes left behind after loomserve exited: {stray}"
        return code
