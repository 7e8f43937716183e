"""Process life cycle: clean stops, crashes, standalone processes, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.stack import ServeStack, free_port, kill_mid_stream, pid_alive


def test_worker_killed_mid_stream_fails_requests_and_is_started_again(tmp_path: Path) -> None:
    stack = ServeStack("--kv-cache-gb", "0.25", log_path=tmp_path / "serve.log")
    try:
        stack.wait_ready()
        worker = stack.child_pid("worker")
        lines, ended_after = kill_mid_stream(stack.base_url, worker, max_tokens=4000)
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert "the worker group is down" in error["message"]
        assert ended_after < 5, f"the stream took {ended_after:.1f} s to fail"
        assert "worker group is down" in stack.wait_unhealthy()["reason"]
        stack.wait_ready()  # the supervisor started a new worker
        assert stack.child_pid("worker") != worker
        resp = httpx.post(stack.base_url + "/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
        assert resp.json()["usage"]["completion_tokens"] == 3
    finally:
        code = stack.stop()
    assert code == 0
    assert "worker exited with code -9; starting it again" in (tmp_path / "serve.log").read_text()


def test_a_worker_that_keeps_dying_stops_the_service(tmp_path: Path) -> None:
    """A worker that cannot start (here: no room for a KV cache) is retried a few times,
    then ``serve`` gives up and exits non-zero rather than looping forever."""
    stack = ServeStack("--kv-cache-gb", "0", log_path=tmp_path / "serve.log")
    assert stack.proc.wait(120) == 1
    assert (tmp_path / "serve.log").read_text().count("starting it again") == 3


def test_supervisor_killed_takes_its_children_along(tmp_path: Path) -> None:
    stack = ServeStack("--kv-cache-gb", "0.25", log_path=tmp_path / "serve.log")
    stack.wait_ready()
    children = list(stack.child_pids)
    assert len(children) == 3
    os.kill(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in children if pid_alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphans left after the supervisor was killed: {left}"


def _spawn(role: str, *args: str, env: dict[str, str] | None = None, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "loomserve.cli", role, *args],
                            env={**os.environ, **(env or {})}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def test_standalone_processes_and_a_failing_step(tmp_path: Path) -> None:
    """Each process started alone with its addresses on the command line. A step
    that raises in the worker fails the requests in it, and the service recovers."""
    gw_addr = f"tcp://127.0.0.1:{free_port()}"
    wk_addr = f"tcp://127.0.0.1:{free_port()}"
    port = free_port()
    procs = [
        _spawn("scheduler", "--gateway-address", gw_addr, "--worker-address", wk_addr, log=tmp_path / "s.log"),
        _spawn("worker", "--scheduler-address", wk_addr, "--kv-cache-gb", "0.25", log=tmp_path / "w.log",
               env={"LOOMSERVE_INJECT_FAILURE_AT_STEP": "2"}),
        _spawn("gateway", "--scheduler-address", gw_addr, "--port", str(port), log=tmp_path / "g.log"),
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("standalone processes did not become ready: " + (tmp_path / "w.log").read_text()[-2000:])
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=5, temperature=0)
        assert failed.value.status_code == 503
        assert "failure injected" in str(failed.value)
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health", timeout=2).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        resp = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=5, temperature=0)
        assert resp.usage is not None and resp.usage.completion_tokens == 5
        assert "dropped" not in (tmp_path / "s.log").read_text()
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
    logs = {name: (tmp_path / name).read_text()[-1500:] for name in ("s.log", "w.log", "g.log")}
    assert codes == [0, 0, 0], logs
    assert not any(pid_alive(p.pid) for p in procs)
