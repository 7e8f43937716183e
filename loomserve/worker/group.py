"""``loomserve worker``: the ranks of one worker group that run on this host.

A group of one is the worker process itself. For ``--tp N`` the command starts
one process per rank it owns (all N by default, or ``--ranks`` on a host of a
multi-host group), each on its own GPU (``cuda:<local index>``) or on the CPU,
and watches them:

* if any rank exits, the others are stopped (SIGTERM, then SIGKILL) and the
  command exits non-zero: a group with a missing rank would wait forever in its
  next collective, so it is never left half alive. The scheduler has already
  seen the rank's connection drop and failed the in-flight requests; whoever
  started the command (``loomserve serve``, a container restart policy) starts
  the group again, and the scheduler takes it back once every rank registers;
* SIGTERM or SIGINT stops every rank and exits 0;
* every rank dies with this process (PR_SET_PDEATHSIG and a watchdog).

All ranks on one host meet at a free local port unless ``--dist-init-address``
names the rendezvous, which a multi-host group needs (rank 0's host).

Pipeline parallelism is not built. It would add a second index beside the rank
(the stage): each stage a tensor-parallel group like this one, ``WorkerReady``
carrying the stage, and the scheduler sending each plan to the first stage's
ranks and taking the result from the last stage's rank 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from loomserve.shared.config import WorkerConfig, config_argv
from loomserve.shared.process import die_with_parent, install_stop_handler, parent_watchdog

log = logging.getLogger(__name__)

_STOP_GRACE_S = 8.0  # under the supervisor's own 10 s before it kills this process


def parse_ranks(spec: str | None, size: int) -> list[int]:
    """``None`` -> every rank; "2" / "0-3" / "4,5,6,7" -> those ranks, each below ``size``."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(size))
    ranks: list[int] = []
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            ranks.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"--ranks {spec!r}: expected rank numbers such as 0-3 or 4,5,6,7") from None
    bad = [r for r in ranks if not 0 <= r < size]
    if bad or not ranks or len(set(ranks)) != len(ranks):
        raise ValueError(f"--ranks {spec!r}: each rank once, from 0 to {size - 1} (--tp {size})")
    return ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_devices(config: WorkerConfig, count: int) -> list[str]:
    """One device per local rank: the i-th GPU of this host, or the CPU."""
    if config.device not in ("auto", "cuda"):
        if count > 1 and config.device != "cpu":
            raise ValueError(f"--device {config.device} names one device; a group of {count} ranks here "
                             f"needs --device cuda (one GPU each) or cpu")
        return [config.device] * count
    import torch

    if not torch.cuda.is_available():
        if config.device == "cuda":
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
        return ["cpu"] * count
    if torch.cuda.device_count() < count:
        raise RuntimeError(f"{count} ranks need {count} GPUs here; torch sees {torch.cuda.device_count()}")
    return [f"cuda:{i}" for i in range(count)]


def run_worker_group(config: WorkerConfig) -> int:
    from loomserve.worker.server import serve_worker

    ranks = parse_ranks(config.ranks, config.tp)
    if config.tp > 1 and len(ranks) < config.tp and config.dist_init_address is None:
        raise ValueError("ranks of one group on several hosts need --dist-init-address (rank 0's host:port)")
    if len(ranks) == 1 and (config.tp == 1 or config.dist_init_address is not None):
        serve_worker(config, ranks[0])
        return 0
    address = config.dist_init_address or f"127.0.0.1:{_free_port()}"
    devices = _rank_devices(config, len(ranks))
    procs: dict[int, subprocess.Popen[bytes]] = {}
    env = {**os.environ, "LOOMSERVE_SUPERVISOR_PID": str(os.getpid())}
    for rank, device in zip(ranks, devices, strict=True):
        rank_config = dataclasses.replace(config, ranks=str(rank), device=device, dist_init_address=address)
        procs[rank] = subprocess.Popen([sys.executable, "-m", "loomserve.cli", "worker", *config_argv(rank_config)],
                                       env=env, preexec_fn=die_with_parent)
    log.info("worker group of %d: started rank(s) %s on %s, rendezvous %s", config.tp,
             ", ".join(f"{r} (pid {p.pid})" for r, p in procs.items()), ", ".join(devices), address)
    stopping = install_stop_handler(lambda: None)
    parent_watchdog(int(os.environ.get("LOOMSERVE_SUPERVISOR_PID", "0")), lambda: os.kill(os.getpid(), signal.SIGTERM))
    code = 0
    while not stopping.is_set():
        exited = {r: p.returncode for r, p in procs.items() if p.poll() is not None}
        if exited:
            rank, status = next(iter(exited.items()))
            if status == 0:  # the scheduler sent Shutdown to every rank
                log.info("rank %d stopped; stopping the worker group", rank)
            else:
                log.error("rank %d exited with code %d; stopping the worker group", rank, status)
                code = 1
            break
        time.sleep(0.1)
    _stop_all(procs)
    return code


def _stop_all(procs: dict[int, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for rank, proc in procs.items():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("rank %d did not stop in time; killing it", rank)
            proc.kill()
            proc.wait()
