"""Every message that crosses a ZeroMQ socket, and the decoder of each socket.

Wire format: one msgpack frame per message (after ZeroMQ's routing frames),
encoded by msgspec. Structs are ``array_like`` (fields by position, no names
on the wire) and tagged: the first array element is the message's tag, so a
socket carrying several kinds of message decodes them with one typed decoder
over a tagged union. Nothing is pickled; a frame that fails to decode raises
``msgspec.DecodeError`` and the receiver drops it and logs.

Sockets (the side that binds is named first)::

    scheduler ROUTER  <-  gateway DEALER   GatewayToScheduler  / SchedulerToGateway
    scheduler ROUTER  <-  worker DEALER    SchedulerToWorker   / WorkerToScheduler

A worker rank opens with ``WorkerHello`` and gets the scheduler's ``StepLimits``
before it loads its model; it sends ``WorkerReady`` once its KV cache is allocated.
New-request data (prompt tokens, sampling parameters) reaches a worker once,
in ``BatchPlan.new_requests``; later plans carry only what changed.
"""

from __future__ import annotations

import msgspec


class _Msg(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _Data(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True, gc=False):
    pass


class SamplingParams(_Data, frozen=True):
    """How the worker picks tokens for one request, and when the scheduler stops it.

    ``top_k`` 0 and ``top_p`` 1.0 disable those filters; ``temperature`` 0 is greedy.
    ``stop_token_ids`` already holds the tokenizer's EOS ids unless EOS is ignored.
    ``logprobs`` None returns none; k >= 0 returns the sampled token's logprob and
    the top k alternatives.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    stop_token_ids: list[int] = []
    min_tokens: int = 0


class TokenLogprobs(_Data, frozen=True):
    """Log-probabilities of one sampled token, from the model's raw distribution."""

    logprob: float
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class ErrorInfo(_Data, frozen=True):
    """Why a request failed; ``status`` is the HTTP status the gateway answers with."""

    status: int
    message: str
    type: str = "invalid_request_error"
    retry_after_s: float | None = None


# gateway -> scheduler ------------------------------------------------------


class AddRequest(_Msg, frozen=True):
    """A prompt to generate ``n`` choices of (OpenAI's ``n``).

    With ``n`` > 1 the scheduler prefills the prompt once and forks it into n
    sequences that share its KV blocks. Their outputs carry the ids
    ``choice_request_ids(request_id, n)`` (``<request_id>#<i>``), each ending on
    its own; a seeded choice ``i`` samples with ``seed + i``. Aborting
    ``request_id`` aborts every choice, aborting ``<request_id>#<i>`` only that
    one. ``#`` is therefore not allowed in a request id.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    priority: int = 0
    tenant: str = ""
    traceparent: str | None = None
    queue_timeout_s: float | None = None
    n: int = 1


CHOICE_SEPARATOR = "#"


def choice_request_ids(request_id: str, n: int) -> list[str]:
    """The ids under which the outputs of a request of ``n`` choices arrive."""
    if n == 1:
        return [request_id]
    return [f"{request_id}{CHOICE_SEPARATOR}{i}" for i in range(n)]


class AbortRequest(_Msg, frozen=True):
    request_ids: list[str]


class StatusQuery(_Msg, frozen=True):
    """Asks the scheduler for a ``SchedulerStatus``; ``nonce`` pairs question and answer."""

    nonce: int


class ResetPrefixCache(_Msg, frozen=True):
    """Forget every cached prefix block; answered by ``ControlReply``."""

    nonce: int


GatewayToScheduler = AddRequest | AbortRequest | StatusQuery | ResetPrefixCache


# scheduler -> gateway ------------------------------------------------------

FINISH_REASONS = ("stop", "length", "abort", "error")


class RequestOutput(_Data, frozen=True):
    """What one request produced in one step. ``finish_reason`` set means it ended."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    error: ErrorInfo | None = None


class RequestOutputs(_Msg, frozen=True):
    outputs: list[RequestOutput]


class SchedulerStatus(_Msg, frozen=True):
    nonce: int
    workers_ready: bool
    error: str | None = None
    num_waiting: int = 0
    num_running: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    model: str = ""
    device: str = ""
    max_model_len: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0
    num_scheduled_tokens: int = 0  # tokens computed, prompts and outputs, since start
    num_forks: int = 0  # requests of n > 1 split into their choices after one prefill
    num_block_copies: int = 0  # partial blocks copied on write by those forks


class ControlReply(_Msg, frozen=True):
    nonce: int
    ok: bool
    message: str = ""


SchedulerToGateway = RequestOutputs | SchedulerStatus | ControlReply


# scheduler -> worker -------------------------------------------------------


class NewRequestData(_Data, frozen=True):
    """A request the worker has not seen (or must rebuild after preemption).

    ``token_ids`` is every token known so far (prompt, plus outputs of a
    resumed request); the first ``num_computed_tokens`` are already in the KV
    cache blocks ``block_ids``.
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    traceparent: str | None = None


class CachedRequestData(_Data, frozen=True):
    """A request the worker already holds: only what changed since the last plan."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class BatchPlan(_Msg, frozen=True):
    """One iteration of the engine.

    ``num_scheduled_tokens[id]`` new tokens of each listed request are computed,
    starting at its ``num_computed_tokens``. A request whose known tokens are all
    computed after this step gets one token sampled. ``finished_request_ids``
    lets the worker drop state of requests that ended since the last plan;
    ``block_copies`` are (src, dst) block copies done before the forward pass
    (copy-on-write of a shared partial block).

    ``lookahead``: the scheduler may send the next plan before this one's result
    (asynchronous scheduling). The worker then answers this plan only once the
    next message arrives: after launching the next plan's forward pass, or at a
    ``Flush``. Plans without it are answered as soon as their tokens are known.
    """

    step_id: int
    new_requests: list[NewRequestData] = []
    cached_requests: list[CachedRequestData] = []
    num_scheduled_tokens: dict[str, int] = {}
    finished_request_ids: list[str] = []
    block_copies: list[tuple[int, int]] = []
    lookahead: bool = False


class StepLimits(_Msg, frozen=True):
    """The scheduler's answer to ``WorkerHello``: the most tokens (``--max-num-batched-tokens``)
    and sequences (``--max-num-seqs``) a plan will ever hold. The worker sizes its activation
    reserve and its CUDA graphs by them instead of guessing."""

    max_num_batched_tokens: int
    max_num_seqs: int


class Flush(_Msg, frozen=True):
    """No plan follows for now: answer the last ``lookahead`` plan as soon as it is done."""


class Shutdown(_Msg, frozen=True):
    pass


SchedulerToWorker = StepLimits | BatchPlan | Flush | Shutdown


# worker -> scheduler -------------------------------------------------------


class WorkerHello(_Msg, frozen=True):
    """A rank's first message, before it loads anything: it asks for the ``StepLimits``."""

    rank: int
    world_size: int


class WorkerReady(_Msg, frozen=True):
    """Sent by each rank once its model and KV cache are ready."""

    rank: int
    world_size: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    model: str
    device: str
    # Most sequences of a step replayed from a CUDA graph (0: no graphs); fewer than
    # --max-num-seqs only when the worker was started with a lower --cuda-graph-max-seqs.
    graph_max_seqs: int = 0


class StepResult(_Msg, frozen=True):
    """The tokens sampled in step ``step_id``, one entry per sampled request."""

    step_id: int
    request_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None] = []
    forward_ms: float = 0.0  # launch to tokens on the host
    # Of forward_ms: the worker's own host work on this step (applying the plan, building the
    # inputs, queuing the kernels, decoding the tokens), and the time it sat waiting for the
    # device to hand the tokens over. The rest: the worker on the steps around it, or waiting for
    # the next plan.
    host_ms: float = 0.0
    wait_ms: float = 0.0


class WorkerFailure(_Msg, frozen=True):
    """A rank could not run a step or start; the scheduler fails in-flight requests."""

    rank: int
    message: str


WorkerToScheduler = WorkerHello | WorkerReady | StepResult | WorkerFailure


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


gateway_to_scheduler = msgspec.msgpack.Decoder(GatewayToScheduler)
scheduler_to_gateway = msgspec.msgpack.Decoder(SchedulerToGateway)
scheduler_to_worker = msgspec.msgpack.Decoder(SchedulerToWorker)
worker_to_scheduler = msgspec.msgpack.Decoder(WorkerToScheduler)
