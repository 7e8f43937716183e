"""The gateway process: load the tokenizer, connect to the scheduler, serve HTTP."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import uvicorn

from gateway.app import ModelInfo, create_app
from gateway.engine_client import EngineClient
from gateway.tokenizer import eos_token_ids, load_tokenizer
from shared.config import GatewayConfig
from shared.model_files import DEFAULT_MODEL, DEFAULT_MODEL_FILE, resolve_model
from shared.process import install_stop_handler, parent_watchdog

log = logging.getLogger(__name__)


def served_name(config: GatewayConfig, model_path: Path) -> str:
    if config.served_model_name:
        return config.served_model_name
    if config.model is None or config.model in (DEFAULT_MODEL, "default") or model_path.name == DEFAULT_MODEL_FILE:
        return DEFAULT_MODEL
    return model_path.stem if model_path.is_file() else model_path.name


def serve_gateway(config: GatewayConfig) -> None:
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    model = ModelInfo(served_name(config, model_path), tokenizer, eos_token_ids(tokenizer, model_path))
    engine = EngineClient(config.scheduler_address)
    app = create_app(config, engine, model)
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
    log.info("gateway for %s listening on http://%s:%d (scheduler at %s)",
             model.name, config.host, config.port, config.scheduler_address)
    server.run()
    log.info("gateway stopped")
