"""Configuration of each process, read once at start.

Every field is a command-line option (``--max-num-seqs``) and an environment
variable (``LOOMSERVE_MAX_NUM_SEQS``); the command line wins. Each process logs
its configuration at start with secrets masked.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loomserve.shared.messages import StepLimits

T = TypeVar("T")

DEFAULT_GATEWAY_ADDRESS = "tcp://127.0.0.1:5557"
DEFAULT_WORKER_ADDRESS = "tcp://127.0.0.1:5558"


def _opt(default: Any, help: str, secret: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret, "choices": choices})


@dataclass(frozen=True)
class SchedulerConfig:
    gateway_address: str = _opt(DEFAULT_GATEWAY_ADDRESS, "ZeroMQ address the scheduler binds for gateways")
    worker_address: str = _opt(DEFAULT_WORKER_ADDRESS, "ZeroMQ address the scheduler binds for workers")
    max_num_seqs: int = _opt(256, "most sequences in one batch")
    max_num_batched_tokens: int = _opt(2048, "token budget of one step (decodes + prefill chunks)")
    policy: str = _opt("fcfs", "order of the waiting queue", choices=("fcfs", "priority"))
    batching: str = _opt("continuous", "continuous (iteration-level) or static (whole batches, the naive baseline)",
                         choices=("continuous", "static"))
    max_waiting_requests: int = _opt(4096, "most requests in the waiting queue; more get 503 + Retry-After")
    max_waiting_tokens: int = _opt(4_000_000, "most prompt tokens in the waiting queue; more get 503 + Retry-After")
    queue_timeout_s: float | None = _opt(None, "fail a request still waiting after this long (default: never)")
    queue_full_retry_after_s: float = _opt(1.0, "Retry-After sent with a 503 for a full queue")
    enable_prefix_caching: bool = _opt(True, "reuse KV blocks of earlier requests with the same prefix")
    async_scheduling: bool = _opt(True, "make the next step's plan while the workers compute this one (its decodes "
                                        "continue from tokens sampled on the GPU); false: one step at a time")
    tp: int = _opt(1, "tensor-parallel size: the ranks of the worker group the scheduler waits for")
    step_timeout_s: float = _opt(600.0, "fail in-flight requests if a step takes longer than this")
    otlp_endpoint: str | None = _opt(None, "OpenTelemetry OTLP/HTTP collector for traces, e.g. http://jaeger:4318")

    def step_limits(self) -> StepLimits:
        """What the workers are told in answer to their ``WorkerHello``."""
        return StepLimits(self.max_num_batched_tokens, self.max_num_seqs)


@dataclass(frozen=True)
class WorkerConfig:
    scheduler_address: str = _opt(DEFAULT_WORKER_ADDRESS, "ZeroMQ address of the scheduler's worker socket")
    model: str | None = _opt(None, "GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    load_format: str = _opt("auto", "weights format", choices=("auto", "gguf", "safetensors", "dummy"))
    dtype: str = _opt("auto", "compute dtype: auto = bfloat16 on GPU, float32 on CPU",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = _opt("auto", "cpu, cuda, cuda:N, or auto (GPU if present)")
    block_size: int = _opt(16, "tokens per KV cache block")
    kv_cache_dtype: str = _opt("auto", "KV cache elements: auto = the compute dtype; fp8 = e4m3 (half of bf16's "
                                       "memory and decode reads; rounded to 3 mantissa bits, saturating at +-448)",
                               choices=("auto", "fp8"))
    kv_cache_gb: float = _opt(2.0, "KV cache size in GiB on the CPU")
    gpu_memory_utilization: float = _opt(0.9, "share of GPU memory for weights, activations and KV cache")
    max_model_len: int | None = _opt(None, "longest sequence (default: the model's context length)")
    num_threads: int | None = _opt(None, "torch threads on the CPU (default: all cores; a GPU worker "
                                         "uses 1 once its model is loaded)")
    seed: int = _opt(0, "seed of dummy weights and of unseeded sampling")
    enforce_eager: bool = _opt(False, "never replay CUDA graphs (debugging, memory)")
    cuda_graph_max_tokens: int = _opt(2048, "largest prefill or mixed step, in tokens, replayed from a CUDA "
                                            "graph (0: only decode steps); larger steps run eagerly")
    cuda_graph_max_seqs: int | None = _opt(None, "most sequences in a step replayed from a CUDA graph; steps of "
                                                 "more run eagerly (default: the scheduler's --max-num-seqs)")
    tp: int = _opt(1, "tensor-parallel size: ranks in the worker group, one process per GPU")
    ranks: str | None = _opt(None, "ranks of the group this command starts (default: all); on several hosts, "
                                   "e.g. 0-3 on one and 4-7 on another")
    dist_init_address: str | None = _opt(None, "host:port where the ranks of a group meet (rank 0's host); "
                                               "default: a free local port when all ranks run here")
    otlp_endpoint: str | None = _opt(None, "OpenTelemetry OTLP/HTTP collector for traces, e.g. http://jaeger:4318")


@dataclass(frozen=True)
class GatewayConfig:
    host: str = _opt("127.0.0.1", "address the HTTP server listens on")
    port: int = _opt(8000, "HTTP port")
    reuse_port: bool = _opt(False, "share the port with other gateway processes (SO_REUSEPORT): the kernel spreads "
                                   "connections over them")
    scheduler_address: str = _opt(DEFAULT_GATEWAY_ADDRESS, "ZeroMQ address of the scheduler's gateway socket")
    model: str | None = _opt(None, "model whose tokenizer the gateway uses (default: SmolLM2-135M-Instruct)")
    tokenizer: str = _opt("auto", "auto: the model's own, or a synthetic one for a dummy shape name such as "
                          "llama-3.1-8b; synthetic: one generated at the model's vocabulary size and special ids",
                          choices=("auto", "synthetic"))
    served_model_name: str | None = _opt(None, "model name in the API (default: derived from --model)")
    generation_config: str = _opt("auto", "sampling values for fields a request leaves out: auto (what the model "
                                  "declares: generation_config.json, GGUF metadata, or the default model's card), "
                                  "none (OpenAI's: temperature 1, top_p 1), or a JSON file of those fields")
    max_body_bytes: int = _opt(4 * 1024 * 1024, "largest accepted request body")
    keys_file: str | None = _opt(None, "JSON file of API key digests and their tenants (none: the gateway is open)")
    redis_url: str | None = _opt(None, "Redis shared by gateway replicas: rate limits, response cache, keys",
                                 secret=True)
    redis_keys: bool = _opt(False, "also look API key digests up in Redis (loomserve:keys:<sha256>)")
    rate_limit_rpm: int | None = _opt(None, "requests per minute per tenant (default: unlimited)")
    rate_limit_tpm: int | None = _opt(None, "tokens (prompt + max_tokens) per minute per tenant (default: unlimited)")
    rate_limit_request_burst: int | None = _opt(None, "requests allowed at once (default: the per-minute limit)")
    rate_limit_token_burst: int | None = _opt(None, "tokens allowed at once (default: the per-minute limit)")
    rate_limit_requests_on_failure: str = _opt("open", "requests limit when Redis is down: admit or refuse (503)",
                                               choices=("open", "closed"))
    rate_limit_tokens_on_failure: str = _opt("open", "tokens limit when Redis is down: admit or refuse (503)",
                                             choices=("open", "closed"))
    rate_limit_timeout_ms: float = _opt(50.0, "how long a rate-limit check waits for Redis before that limit's "
                                        "on-failure policy applies (and Redis is left alone for a back-off)")
    response_cache: bool = _opt(True, "replay answers of deterministic requests (temperature 0 or a seed)")
    response_cache_ttl_s: float = _opt(3600.0, "lifetime of a cached answer")
    response_cache_max_entry_bytes: int = _opt(1 << 20, "larger answers are not cached")
    public_metrics: bool = _opt(False, "serve /metrics without an API key")
    admin_tenants: str = _opt("", "comma-separated tenants allowed to call /admin routes (an open gateway: anyone)")
    price_per_1m_input_usd: float = _opt(0.0, "price of a million prompt tokens, for cost attribution")
    price_per_1m_output_usd: float = _opt(0.0, "price of a million completion tokens, for cost attribution")
    ready_timeout_s: float = _opt(10.0, "how long /ready waits for its one-token generation")
    otlp_endpoint: str | None = _opt(None, "OpenTelemetry OTLP/HTTP collector for traces, e.g. http://jaeger:4318")


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; plain types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def env_name(field_name: str) -> str:
    return "LOOMSERVE_" + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per dataclass field; defaults come from the environment first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if any(flag in action.option_strings for action in parser._actions):
            continue  # shared by two configs (serve): one option feeds both
        tp = _base_type(hints[f.name])
        converter = parse_bool if tp is bool else tp
        env = os.environ.get(env_name(f.name))
        default = converter(env) if env is not None else f.default
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default}]"
        if tp is bool:
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, default=default,
                                metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, type=converter, default=default, help=help_text,
                                choices=f.metadata["choices"])


def from_namespace(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {name: getattr(ns, name) for name in names if hasattr(ns, name)}
    values.update(overrides)
    return cls(**values)


def describe(config: Any) -> str:
    """``name=value`` pairs for the start-up log, secrets masked."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("secret") and value:
            value = "****"
        parts.append(f"{f.name}={value}")
    return " ".join(parts)


def config_argv(config: Any) -> list[str]:
    """A config dataclass back to command-line options (None values left out)."""
    argv = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        argv += ["--" + f.name.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv
