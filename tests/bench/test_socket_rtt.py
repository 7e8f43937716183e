"""bench.socket_rtt: a short run measures a positive cost for every case."""

from __future__ import annotations

import json

from bench import socket_rtt


def test_short_run(tmp_path) -> None:
    out = tmp_path / "rtt.json"
    assert socket_rtt.main(["--out", str(out), "--steps-ms", "1", "--iterations", "20"]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [(c["step_ms"], c["scheduler_spins"]) for c in cases] == [(1.0, False), (1.0, True)]
    for c in cases:
        assert 0 < c["p50_us"] <= c["p90_us"] < 1e6
