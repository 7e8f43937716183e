"""The ``loomserve`` command line.

    loomserve serve        scheduler + worker + gateway on this host (the default model if none given)
    loomserve gateway      the HTTP gateway alone
    loomserve scheduler    the scheduler alone
    loomserve worker       one worker group alone (--tp N: N ranks, one process each)
    loomserve fetch-model  download the default model into the cache and exit
    loomserve new-key      make an API key, add its digest to a keys file, print the key

Each option also reads an environment variable (``--max-num-seqs`` from
``LOOMSERVE_MAX_NUM_SEQS``); ``--help`` lists them.

``serve --gateway-workers N`` runs N gateway processes on one port (SO_REUSEPORT), for
when one process's CPU cannot keep up with the streams (SSE, detokenising, JSON). The
scheduler routes each request's outputs back to the gateway that sent it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loomserve.shared.config import (
    GatewayConfig,
    SchedulerConfig,
    WorkerConfig,
    add_arguments,
    config_argv,
    describe,
    env_name,
    from_namespace,
)
from loomserve.shared.model_files import ModelFileError, default_model_path, resolve_model
from loomserve.shared.process import setup_logging

if TYPE_CHECKING:
    from loomserve.supervisor import Child

log = logging.getLogger("loomserve")

# reuse_port: serve sets it itself, on when it starts several gateways.
_SERVE_SKIPS = ("gateway_address", "worker_address", "scheduler_address", "ranks", "dist_init_address", "reuse_port")
# Without Redis each gateway process keeps these buckets in its own memory.
_RATE_LIMIT_FIELDS = ("rate_limit_rpm", "rate_limit_tpm", "rate_limit_request_burst", "rate_limit_token_burst")
# prometheus_client's own variable: where each process keeps its metric values, for /metrics to sum.
_METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loomserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the whole service on this host")
    add_arguments(serve, GatewayConfig, skip=_SERVE_SKIPS)
    add_arguments(serve, SchedulerConfig, skip=_SERVE_SKIPS)
    add_arguments(serve, WorkerConfig, skip=_SERVE_SKIPS)
    workers_env = env_name("gateway_workers")
    # A string default goes through ``type`` too, so a bad environment value gets the same error.
    serve.add_argument("--gateway-workers", type=_at_least_one, default=os.environ.get(workers_env, "1"),
                       metavar="N", help="gateway processes sharing the HTTP port (SO_REUSEPORT), for more streamed "
                                         "tokens per second than one process's CPU allows; rate limits then need "
                                         f"--redis-url [env {workers_env}; default 1]")
    add_arguments(sub.add_parser("gateway", help="run the HTTP gateway"), GatewayConfig)
    add_arguments(sub.add_parser("scheduler", help="run the scheduler"), SchedulerConfig)
    add_arguments(sub.add_parser("worker", help="run a worker group (or some of its ranks)"), WorkerConfig)
    sub.add_parser("fetch-model", help="download the default model into the cache")
    new_key = sub.add_parser("new-key", help="make an API key, add its SHA-256 to a keys file, print the key")
    new_key.add_argument("--tenant", required=True, help="who the key belongs to (rate limits and caches are per "
                                                         "tenant)")
    new_key.add_argument("--name", default="", help="a label for the key, shown in logs")
    new_key.add_argument("--keys-file", required=True, help="the JSON keys file to add it to (created if missing); "
                                                            "start the gateway with --keys-file pointing at it")
    return parser


def _gateway_workers_problem(ns: argparse.Namespace) -> str | None:
    """Why ``ns.gateway_workers`` gateways cannot run with these options, or None.

    Without Redis every gateway process enforces each rate limit in its own memory, and the
    kernel spreads connections over the processes, so N of them would admit N times the limit.
    The response cache only gets less effective per process, so it does not count here.
    """
    if ns.gateway_workers == 1 or ns.redis_url:
        return None
    from loomserve.gateway.auth import load_keys_file

    found = ["--" + name.replace("_", "-") for name in _RATE_LIMIT_FIELDS if getattr(ns, name) is not None]
    try:
        if ns.keys_file and any(record.limits for record in load_keys_file(ns.keys_file)):
            found.append(f"per-key limits in --keys-file {ns.keys_file}")
    except ValueError as e:
        return str(e)
    if not found:
        return None
    return (f"--gateway-workers {ns.gateway_workers} with {', '.join(found)} and no --redis-url: each gateway "
            f"process would keep its own rate-limit buckets and admit up to {ns.gateway_workers} times the limit. "
            f"Pass --redis-url to share the limits, or use --gateway-workers 1.")


def _gateway_children(config: GatewayConfig, count: int, metrics_dir: str) -> list[Child]:
    """One gateway, or ``count`` of them sharing the port and one metrics directory."""
    from loomserve.supervisor import Child

    argv = ["gateway", *config_argv(config)]
    if count == 1:
        return [Child("gateway", argv, front=True)]
    env = {_METRICS_DIR_ENV: metrics_dir}
    return [Child(f"gateway-{i}", argv, front=True, env=env) for i in range(1, count + 1)]


def serve_configs(ns: argparse.Namespace, runtime: str) -> tuple[SchedulerConfig, WorkerConfig, GatewayConfig]:
    """The three processes' configurations under ``serve``, joined by ipc sockets in ``runtime``.
    The worker learns the scheduler's step limits from the scheduler itself (``StepLimits``)."""
    gateway_address = f"ipc://{runtime}/gateway.sock"
    worker_address = f"ipc://{runtime}/worker.sock"
    scheduler = from_namespace(SchedulerConfig, ns, gateway_address=gateway_address,
                               worker_address=worker_address)
    worker = from_namespace(WorkerConfig, ns, scheduler_address=worker_address)
    gateway = from_namespace(GatewayConfig, ns, scheduler_address=gateway_address,
                             reuse_port=ns.gateway_workers > 1)
    return scheduler, worker, gateway


def _serve(ns: argparse.Namespace) -> int:
    from loomserve.supervisor import Child, Supervisor

    problem = _gateway_workers_problem(ns)
    if problem is not None:
        log.error("%s", problem)
        return 2
    if ns.load_format != "dummy":
        model_path = resolve_model(ns.model)  # download once here, not in two children at a time
        ns.model = str(model_path)
    runtime = tempfile.mkdtemp(prefix="loomserve-")
    metrics_dir = os.path.join(runtime, "metrics")
    scheduler, worker, gateway = serve_configs(ns, runtime)
    for config in (scheduler, worker, gateway):
        log.info("%s: %s", type(config).__name__, describe(config))
    if ns.gateway_workers > 1:
        os.mkdir(metrics_dir)
        log.info("%d gateway processes share port %d; their metrics are summed in %s",
                 ns.gateway_workers, gateway.port, metrics_dir)
    children = [
        Child("scheduler", ["scheduler", *config_argv(scheduler)]),
        Child("worker", ["worker", *config_argv(worker)], restartable=True),
        *_gateway_children(gateway, ns.gateway_workers, metrics_dir),
    ]
    supervisor = Supervisor(children, f"http://{gateway.host}:{gateway.port}/health")
    try:
        return supervisor.run()
    finally:
        if os.path.isdir(metrics_dir):
            shutil.rmtree(metrics_dir)
        for name in ("gateway.sock", "worker.sock"):
            path = os.path.join(runtime, name)
            if os.path.exists(path):
                os.unlink(path)
        os.rmdir(runtime)


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    # Under ``serve``, the supervisor's name for this process (gateway-2 of several).
    setup_logging(os.environ.get("LOOMSERVE_PROCESS_NAME", ns.command))
    try:
        if ns.command == "serve":
            return _serve(ns)
        if ns.command == "fetch-model":
            log.info("default model at %s", default_model_path())
            return 0
        if ns.command == "new-key":
            from loomserve.gateway.auth import add_key_to_file

            try:
                key = add_key_to_file(ns.keys_file, ns.tenant, ns.name)
            except ValueError as e:
                log.error("%s", e)
                return 2
            log.info("added a key of tenant %s to %s; the key is printed once, keep it", ns.tenant, ns.keys_file)
            sys.stdout.write(key + "\n")
            return 0
        if ns.command == "scheduler":
            from loomserve.scheduler.server import serve_scheduler

            config = from_namespace(SchedulerConfig, ns)
            log.info("config: %s", describe(config))
            serve_scheduler(config)
        elif ns.command == "worker":
            from loomserve.worker.group import run_worker_group

            wconfig = from_namespace(WorkerConfig, ns)
            log.info("config: %s", describe(wconfig))
            return run_worker_group(wconfig)
        elif ns.command == "gateway":
            from loomserve.gateway.server import serve_gateway

            gconfig = from_namespace(GatewayConfig, ns)
            log.info("config: %s", describe(gconfig))
            serve_gateway(gconfig)
    except ModelFileError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
