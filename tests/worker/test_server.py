"""A worker process opens with ``WorkerHello`` and loads nothing until the scheduler's
``StepLimits`` arrive; then it registers (``WorkerReady``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import zmq

from loomserve.shared import messages as m
from tests.stack import free_port


def test_the_worker_waits_for_the_step_limits_before_it_loads_the_model(default_model_path: Path,
                                                                        tmp_path: Path) -> None:
    ctx = zmq.Context()
    scheduler = ctx.socket(zmq.ROUTER)
    scheduler.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler.bind(address)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "loomserve", "worker", "--scheduler-address", address,
                               "--model", str(default_model_path), "--kv-cache-gb", "0.1"],
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        assert scheduler.poll(60_000), "the worker sent nothing"
        routing_id, frame = scheduler.recv_multipart()
        assert m.worker_to_scheduler.decode(frame) == m.WorkerHello(rank=0, world_size=1)
        time.sleep(2.0)
        assert not scheduler.poll(0), "the worker went on without the step limits"
        assert "model loaded" not in log.read_text()
        scheduler.send_multipart([routing_id, m.encoder().encode(m.StepLimits(512, 8))])
        assert scheduler.poll(120_000), log.read_text()
        _, frame = scheduler.recv_multipart()
        ready = m.worker_to_scheduler.decode(frame)
        assert isinstance(ready, m.WorkerReady) and ready.num_kv_blocks > 0
        assert "step limits: 512 tokens, 8 sequences" in log.read_text()
        scheduler.send_multipart([routing_id, m.encoder().encode(m.Shutdown())])
        assert worker.wait(60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        scheduler.close()
        ctx.term()
