"""The ``loomserve`` command line.

    loomserve serve        scheduler + worker + gateway on this host (the default model if none given)
    loomserve gateway      the HTTP gateway alone
    loomserve scheduler    the scheduler alone
    loomserve worker       one worker group alone (--tp N: N ranks, one process each)
    loomserve fetch-model  download the default model into the cache and exit

Each option also reads an environment variable (``--max-num-seqs`` from
``LOOMSERVE_MAX_NUM_SEQS``); ``--help`` lists them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence

from shared.config import (
    GatewayConfig,
    SchedulerConfig,
    WorkerConfig,
    add_arguments,
    describe,
    from_namespace,
)
from shared.model_files import ModelFileError, default_model_path, resolve_model
from shared.process import setup_logging

log = logging.getLogger("loomserve")

_SERVE_SKIPS = ("gateway_address", "worker_address", "scheduler_address", "ranks", "dist_init_address")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loomserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the whole service on this host")
    add_arguments(serve, GatewayConfig, skip=_SERVE_SKIPS)
    add_arguments(serve, SchedulerConfig, skip=_SERVE_SKIPS)
    add_arguments(serve, WorkerConfig, skip=_SERVE_SKIPS)
    add_arguments(sub.add_parser("gateway", help="run the HTTP gateway"), GatewayConfig)
    add_arguments(sub.add_parser("scheduler", help="run the scheduler"), SchedulerConfig)
    add_arguments(sub.add_parser("worker", help="run a worker group (or some of its ranks)"), WorkerConfig)
    sub.add_parser("fetch-model", help="download the default model into the cache")
    return parser


def _serve(ns: argparse.Namespace) -> int:
    from shared.supervisor import Child, Supervisor, config_argv

    if ns.load_format != "dummy":
        model_path = resolve_model(ns.model)  # download once here, not in two children at a time
        ns.model = str(model_path)
    runtime = tempfile.mkdtemp(prefix="loomserve-")
    gateway_address = f"ipc://{runtime}/gateway.sock"
    worker_address = f"ipc://{runtime}/worker.sock"
    scheduler = from_namespace(SchedulerConfig, ns, gateway_address=gateway_address,
                               worker_address=worker_address)
    worker = from_namespace(WorkerConfig, ns, scheduler_address=worker_address)
    gateway = from_namespace(GatewayConfig, ns, scheduler_address=gateway_address)
    for config in (scheduler, worker, gateway):
        log.info("%s: %s", type(config).__name__, describe(config))
    children = [
        Child("scheduler", ["scheduler", *config_argv(scheduler)]),
        Child("worker", ["worker", *config_argv(worker)], restartable=True),
        Child("gateway", ["gateway", *config_argv(gateway)]),
    ]
    supervisor = Supervisor(children, f"http://{gateway.host}:{gateway.port}/health")
    try:
        return supervisor.run()
    finally:
        for name in ("gateway.sock", "worker.sock"):
            path = os.path.join(runtime, name)
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(runtime)


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    setup_logging(ns.command)
    try:
        if ns.command == "serve":
            return _serve(ns)
        if ns.command == "fetch-model":
            log.info("default model at %s", default_model_path())
            return 0
        if ns.command == "scheduler":
            from scheduler.server import serve_scheduler

            config = from_namespace(SchedulerConfig, ns)
            log.info("config: %s", describe(config))
            serve_scheduler(config)
        elif ns.command == "worker":
            from worker.group import run_worker_group

            wconfig = from_namespace(WorkerConfig, ns)
            log.info("config: %s", describe(wconfig))
            return run_worker_group(wconfig)
        elif ns.command == "gateway":
            from gateway.server import serve_gateway

            gconfig = from_namespace(GatewayConfig, ns)
            log.info("config: %s", describe(gconfig))
            serve_gateway(gconfig)
    except ModelFileError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
