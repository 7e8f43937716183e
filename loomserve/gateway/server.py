"""The gateway process: load the tokenizer, connect to the scheduler, serve HTTP."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

import uvicorn

from loomserve.gateway.app import create_app
from loomserve.gateway.auth import KeyStore, load_keys_file
from loomserve.gateway.engine_client import EngineClient
from loomserve.gateway.model_info import ModelInfo
from loomserve.gateway.sampling_defaults import GenerationConfigError, load_sampling_defaults
from loomserve.gateway.synthetic_tokenizer import synthetic_tokenizer_for
from loomserve.gateway.tokenizer import eos_token_ids, load_tokenizer
from loomserve.shared.config import GatewayConfig
from loomserve.shared.dummy_shapes import DUMMY_SHAPES, dummy_shape
from loomserve.shared.model_files import DEFAULT_MODEL, DEFAULT_MODEL_FILE, ModelFileError, resolve_model
from loomserve.shared.process import install_stop_handler, parent_watchdog
from loomserve.shared.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)


def served_name(config: GatewayConfig, model_path: Path) -> str:
    if config.served_model_name:
        return config.served_model_name
    if config.model is None or config.model in (DEFAULT_MODEL, "default") or model_path.name == DEFAULT_MODEL_FILE:
        return DEFAULT_MODEL
    return model_path.stem if model_path.is_file() else model_path.name


def model_revision(model_path: Path) -> str:
    """Changes whenever the weights do (size and modification time of every weight file)."""
    files = [model_path] if model_path.is_file() else sorted(
        p for p in model_path.iterdir() if p.suffix in (".safetensors", ".json", ".gguf"))
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def key_store(config: GatewayConfig) -> KeyStore:
    records = load_keys_file(config.keys_file) if config.keys_file else []
    if config.redis_keys and not config.redis_url:
        raise ValueError("--redis-keys needs --redis-url")
    return KeyStore(records, redis_keys=config.redis_keys)


def uses_synthetic_tokenizer(config: GatewayConfig) -> bool:
    """``--tokenizer synthetic``, or ``auto`` with a dummy shape name that is no local path."""
    if config.tokenizer == "synthetic":
        return True
    return (config.model is not None and config.model.lower() in DUMMY_SHAPES
            and not Path(config.model).expanduser().exists())


def synthetic_model_info(config: GatewayConfig) -> ModelInfo:
    """The served model with a tokenizer generated at its shape (see gateway.synthetic_tokenizer)."""
    shape = dummy_shape(config.model) if config.model is not None else None
    if shape is None:
        raise ModelFileError(
            f"--tokenizer synthetic needs --model naming a dummy shape ({', '.join(DUMMY_SHAPES)}) or a "
            f"directory with a config.json, not {config.model!r}")
    assert config.model is not None
    path = Path(config.model).expanduser()
    name = config.served_model_name or (path.name if path.is_dir() else config.model.lower())
    tokenizer, eos = synthetic_tokenizer_for(shape, name)
    log.info("synthetic tokenizer for %s: %d tokens (words t<id>, ASCII characters), BOS %s, EOS %s",
             name, len(tokenizer), tokenizer.bos_token_id, eos)
    # The weights of a dummy model come from the worker's seed, which the gateway does not
    # know: the revision names the shape only.
    revision = model_revision(path) if path.is_dir() else f"dummy-{config.model.lower()}"
    return ModelInfo(name, tokenizer, eos, revision,
                     load_sampling_defaults(config.generation_config, path if path.is_dir() else None))


def load_model_info(config: GatewayConfig) -> ModelInfo:
    if uses_synthetic_tokenizer(config):
        return synthetic_model_info(config)
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    return ModelInfo(served_name(config, model_path), tokenizer, eos_token_ids(tokenizer, model_path),
                     model_revision(model_path), load_sampling_defaults(config.generation_config, model_path))


def shared_listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other gateway processes may bind as well.

    With SO_REUSEPORT on every one of them, the kernel hashes each new connection to one
    of the processes listening there, so N gateways share one port and its load. Linux
    lets only processes of the same user join, so no other user can take connections.
    uvicorn calls ``listen()`` after the app's start-up, so a replica gets connections
    only once it can serve them.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve_gateway(config: GatewayConfig) -> None:
    setup_tracing("loomserve-gateway", config.otlp_endpoint)
    try:
        model = load_model_info(config)
    except GenerationConfigError as e:
        log.error("--generation-config: %s", e)
        raise SystemExit(2) from e
    log.info("requests that leave sampling fields out get %s", model.sampling_defaults.describe())
    if not config.redis_url:
        log.warning("no --redis-url: rate limits and the response cache live in this process and are not "
                    "shared with other gateway replicas")
    try:
        sockets = [shared_listening_socket(config.host, config.port)] if config.reuse_port else None
    except OSError as e:  # as uvicorn does for a port it binds itself: one line, no traceback
        log.error("cannot listen on %s:%d: %s", config.host, config.port, e)
        raise SystemExit(1) from e
    engine = EngineClient(config.scheduler_address)
    app = create_app(config, engine, model, key_store(config))
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=30, lifespan="on",
    ))

    def stop() -> None:
        server.should_exit = True

    # uvicorn handles SIGTERM/SIGINT itself (graceful drain), then re-raises the
    # signal into the handler it found: ours, so the process exits 0, not -15.
    install_stop_handler(stop)
    parent_watchdog(int(os.environ.get("LOOMSERVE_SUPERVISOR_PID", "0")), stop)
    log.info("gateway for %s listening on http://%s:%d%s (scheduler at %s)", model.name, config.host, config.port,
             ", port shared with other gateways" if config.reuse_port else "", config.scheduler_address)
    try:
        server.run(sockets=sockets)
    finally:
        shutdown_tracing()
    log.info("gateway stopped")
