"""Turns a ``BatchPlan`` into one forward pass and sampled tokens.

The runner keeps, per request, what the plan sent once (tokens, sampling
parameters, block table) and extends it with the diffs of later plans and with
the tokens it samples itself. For each step it lays the scheduled tokens of all
requests out on one flattened token axis (see ``worker.attention.base``),
runs the model, and samples one token for every request whose known tokens are
all computed after this step (a finished prefill, or a decode).

On a GPU:

* the model runs in bf16 (``DeviceInfo``), with the Triton attention backend and
  the fused Triton norm / rotary / activation layers;
* the KV cache takes what is left of ``gpu_memory_utilization`` after the
  weights and the peak of a profiling step as large as the scheduler's largest
  (``StepLimits``: its token budget, and as many sampled rows as it runs sequences);
* pure-decode steps of up to ``cuda_graph_max_seqs`` sequences (default: the
  scheduler's ``max_num_seqs``) replay CUDA graphs captured at start-up
  (``worker.cuda_graphs``), and so do prefill and mixed steps of up to
  ``cuda_graph_max_tokens`` tokens (at most the token budget) over as many
  sequences; larger steps run eagerly;
* a step's inputs go to the device as non-blocking copies from pinned host
  memory (buffers reused round robin, ``PinnedSlots``), so the host waits for
  the device once per step: when it reads the sampled tokens.

A step runs in three calls: ``launch`` (apply the plan, queue the forward
pass), ``sample`` (queue logits and sampling) and ``finalize`` (read the tokens,
append them to their requests). ``execute`` makes them one after the other. With
asynchronous scheduling the worker launches step K+1 before it finalizes step K,
so the GPU computes K+1 while the host reads K's tokens and answers the
scheduler; K+1's decodes take their input tokens (sampled by K, unknown to the
host yet) from K's tokens on the device (``LateTokens``). Sampling K+1 waits for
K's finalize, since penalties and ``min_tokens`` count K's tokens; the forward
pass is what overlaps.

In a tensor-parallel group (``worker.parallel``) every rank runs the same
steps on its share of the model; every rank sees the whole logits, rank 0
samples and broadcasts the tokens, so all ranks extend their requests alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loomserve.shared.config import WorkerConfig
from loomserve.shared.messages import BatchPlan, SamplingParams, StepLimits, StepResult, TokenLogprobs
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.cuda_graphs import (
    GRAPH_MAX_SEQS,
    DecodeGraphs,
    LateTokens,
    MixedGraphs,
    decode_buckets,
    mixed_buckets,
    pad_decode_batch,
)
from loomserve.worker.device import DeviceInfo
from loomserve.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from loomserve.worker.loader import load_model
from loomserve.worker.parallel import SINGLE, TensorParallel
from loomserve.worker.sampler import PendingSample, SamplingState, sample, sample_async

log = logging.getLogger(__name__)

# The decode graphs' own memory pool, kept out of the KV cache, per 256 sequences of
# the largest batch: decode activations of at most 256 tokens. Captures of 256 took
# 160 MiB (llama-3.2-1b) and 126 MiB (llama-3.1-8b) on an H200, of 512 266 MiB at
# llama-3.1-8b; start-up logs what they took. The mixed-step graphs' pool is sized
# from the profiling step's forward pass (its activations scale with the token count;
# the sampling's, which dominate at a small budget, do not) plus this margin.
CUDA_GRAPH_RESERVE_BYTES = 256 << 20
MIXED_GRAPH_MARGIN_BYTES = 64 << 20


def _aligned(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple. The arrays of a step's inputs start at such offsets
    so that every device view is 16-byte aligned: Triton specialises kernels on pointer
    alignment, and a misaligned view would build another kernel variant mid-serving."""
    return -(-n // multiple) * multiple


@dataclass
class RequestState:
    token_ids: list[int]
    block_ids: np.ndarray  # (num_blocks,) int32
    sampling: SamplingState


class PinnedSlots:
    """Host buffers for a step's inputs (pinned on a GPU host), reused round robin rather
    than allocated for every step.

    A slot is written again only after the copies queued from it have run: ``done``
    records an event once the step using the slot is launched, and ``take`` waits on
    it. With ``SLOTS`` slots and at most one step in flight it has always passed.
    """

    SLOTS = 3

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(self.SLOTS)]
        self._copied: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self._next = 0

    def take(self) -> int:
        """The next slot, free to write."""
        slot = self._next
        self._next = (slot + 1) % self.SLOTS
        event, self._copied[slot] = self._copied[slot], None
        if event is not None:
            event.synchronize()
        return slot

    def buffer(self, slot: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """``numel`` elements of ``dtype`` in ``slot`` (one buffer per dtype; grows, by
        doubling, when a step needs more)."""
        held = self._buffers[slot].get(dtype)
        if held is None or held.numel() < numel:
            size = max(numel, 2 * held.numel() if held is not None else 4096)
            # A normal tensor even when allocated under inference mode (``launch``), so that
            # a step built outside it may write into the buffer too.
            with torch.inference_mode(False):
                held = torch.empty(size, dtype=dtype, pin_memory=self.pin)
            self._buffers[slot][dtype] = held
        return held[:numel]

    def done(self, slot: int) -> None:
        """The copies from ``slot`` are queued on the current stream."""
        if self.pin:
            event = torch.cuda.Event()
            event.record()
            self._copied[slot] = event


@dataclass
class LaunchedStep:
    """A step whose forward pass (``launch``), then sampling (``sample``), are queued on
    the device; ``finalize`` reads its tokens. Until then they exist only on the
    device, where the next step's decodes take their inputs from (``LateTokens``)."""

    step_id: int
    sample_ids: list[str]
    states: list[RequestState]  # of sample_ids, held here: a request may end before finalize
    hidden: torch.Tensor | None  # (S, hidden) rows to sample, until ``sample``
    started: float  # perf_counter at launch
    host_s: float = 0.0  # host time spent on it so far (launch, sample, finalize), waits excluded
    pending: PendingSample | None = None
    tokens: torch.Tensor | None = None  # (S,) int64 on the device, every rank's, after ``sample``
    rows: dict[str, int] | None = None  # request id -> row of ``tokens``, built when a later step asks


@dataclass
class HostBatch:
    """One step's flattened batch in host memory (pinned on a GPU host)."""

    token_data: np.ndarray  # (3, T) int64: input ids, positions, slot mapping
    query_start_loc: np.ndarray  # (B + 1,) int32
    seq_lens: np.ndarray  # (B,) int32
    block_tables: np.ndarray  # (B, max_blocks) int32, padded with 0
    sample_rows: np.ndarray  # (S,) int64: row in T of each sampled request's last token
    sample_ids: list[str]
    # Decode rows whose input token the previous step samples: (row in T, its row there).
    late: list[tuple[int, int]]
    max_query_len: int
    # The pinned tensors behind the arrays above, copied to the device as two transfers;
    # every array starts at a 16-byte boundary (see _aligned).
    host_i64: torch.Tensor  # token_data rows, then sample_rows
    host_i32: torch.Tensor  # query_start_loc, seq_lens, then block_tables
    row_stride: int  # elements between token_data rows in host_i64
    seq_lens_at: int  # offsets into host_i32
    block_tables_at: int
    slot: int  # of ModelRunner.staging, holding host_i64 and host_i32

    @property
    def num_tokens(self) -> int:
        return int(self.token_data.shape[1])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def samples_every_row(self) -> bool:
        """A decode batch: one token per sequence, each sampled. (A one-token chunk of
        a prompt is not sampled.)"""
        return len(self.sample_ids) == self.num_tokens


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor | None  # (S,) into T; None: every row, in order


class ModelRunner:
    """Model, KV cache and per-request state of one worker.

    ``use_cuda_graphs`` (GPU only) captures decode graphs at start-up; the
    attribute of that name can be cleared later to run every step eagerly.
    """

    def __init__(
        self,
        config: WorkerConfig,
        model_path: Path | str,
        device: DeviceInfo,
        limits: StepLimits,
        *,
        use_cuda_graphs: bool = True,
        tp: TensorParallel = SINGLE,
    ) -> None:
        self.config = config
        self.tp = tp
        self.device = device.device
        self.dtype = device.dtype
        self._pin = device.is_cuda
        self.staging = PinnedSlots(self._pin)
        started = time.monotonic()
        self.model, self.model_config = load_model(
            model_path,
            load_format=config.load_format,
            dtype=self.dtype,
            device=self.device,
            seed=config.seed,
            attn_backend=device.attention_backend(),
            tp=tp,
        )
        log.info("model loaded in %.1f s", time.monotonic() - started)
        self.model.eval()
        self.block_size = config.block_size
        model_len = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        self.use_cuda_graphs = use_cuda_graphs and device.is_cuda
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype

        reserved = 0
        # No plan holds more tokens than the budget: neither do the profiling step nor the graphs.
        budget = limits.max_num_batched_tokens
        mixed_tokens = min(config.cuda_graph_max_tokens, budget)
        mixed_sizes = mixed_buckets(mixed_tokens) if self.use_cuda_graphs else ()
        graph_seqs = limits.max_num_seqs if config.cuda_graph_max_seqs is None else config.cuda_graph_max_seqs
        if graph_seqs < 1:
            raise ValueError(f"--cuda-graph-max-seqs must be at least 1, got {graph_seqs}")
        if device.is_cuda:
            activations, forward = self._profile_activation_bytes(budget, min(limits.max_num_seqs, budget))
            reserved = activations
            if self.use_cuda_graphs:
                reserved += CUDA_GRAPH_RESERVE_BYTES * -(-graph_seqs // GRAPH_MAX_SEQS)
            if mixed_sizes:
                reserved += forward * max(mixed_sizes) // budget + MIXED_GRAPH_MARGIN_BYTES
        available = device.kv_cache_bytes(config, reserved)
        self.num_kv_heads = self.model.num_kv_heads  # this rank's
        bytes_per_block = kv_cache_bytes_per_block(self.model_config, self.block_size, self.kv_dtype,
                                                   self.num_kv_heads)
        self.num_blocks = available // bytes_per_block
        if self.num_blocks < 2:
            raise RuntimeError(
                f"no room for the KV cache: {bytes_per_block} bytes per block, {available} bytes available "
                f"({reserved} reserved for activations); raise --kv-cache-gb or --gpu-memory-utilization, "
                f"or use a smaller model"
            )
        self.kv_caches = allocate_kv_caches(
            self.model_config, self.num_blocks, self.block_size, self.kv_dtype, self.device, self.num_kv_heads
        )
        log.info("KV cache: %d blocks of %d tokens, %.2f GiB of %s", self.num_blocks, self.block_size,
                 self.num_blocks * bytes_per_block / (1 << 30), str(self.kv_dtype).removeprefix("torch."))
        self.states: dict[str, RequestState] = {}
        # The last step sampled and not finalized: at most one (see ``launch``).
        self._unfinalized: LaunchedStep | None = None
        self._unseeded = torch.Generator(device=self.device).manual_seed(config.seed)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        # Most sequences of a step replayed from a graph (0: none); the scheduler checks it
        # against its --max-num-seqs.
        self.graph_max_seqs = graph_seqs if self.use_cuda_graphs else 0
        if self.use_cuda_graphs:
            longest = min(self.max_model_len, self.num_blocks * self.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_caches, max_seq_len=longest, block_size=self.block_size,
                                       buckets=decode_buckets(graph_seqs))
            self.graphs.capture()
            if mixed_sizes:
                self.mixed_graphs = MixedGraphs(
                    self.model, self.kv_caches, max_seq_len=longest, block_size=self.block_size, buckets=mixed_sizes,
                    max_seqs=graph_seqs,
                )
                self.mixed_graphs.capture()

    def reset(self) -> None:
        self.states.clear()
        self._unfinalized = None

    # -- start-up ------------------------------------------------------------

    @torch.inference_mode()
    def _profile_activation_bytes(self, num_tokens: int, num_sampled: int) -> tuple[int, int]:
        """Peak device memory of one ``num_tokens``-token prefill step and the sampling
        (temperature and top-p: the costliest path) of ``num_sampled`` rows, beyond what
        is allocated now; and the peak of the forward pass alone.

        The attention reads a one-block scratch cache: every block-table entry
        points at it and no token is written (slot -1), so the step computes at
        full size without a real cache.
        """
        dev = self.device
        seq_len = min(self.max_model_len, num_tokens)
        num_seqs = -(-num_tokens // seq_len)
        lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
        starts = np.concatenate(([0], np.cumsum(lens))).tolist()
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        scratch = allocate_kv_caches(self.model_config, 1, self.block_size, self.kv_dtype, dev,
                                     self.model.num_kv_heads)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((num_seqs, -(-seq_len // self.block_size)), dtype=torch.int32, device=dev),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
            max_query_len=seq_len,
            max_seq_len=seq_len,
            query_start_loc_cpu=starts,
            seq_lens_cpu=lens,
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)
        params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9)
        states = [SamplingState(params, [0], device=dev) for _ in range(num_sampled)]
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_reserved(dev)
        started = time.monotonic()
        hidden = self.model(input_ids, positions, scratch, meta)  # (num_tokens, hidden)
        torch.cuda.synchronize(dev)
        forward = torch.cuda.max_memory_reserved(dev) - before
        logits = self.model.compute_logits(hidden[:num_sampled])
        sample(logits, states, torch.Generator(device=dev).manual_seed(0))
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_reserved(dev) - before
        del hidden, logits, scratch, meta, positions, input_ids
        torch.cuda.empty_cache()
        log.info("profiling step of %d tokens: %.0f MiB of activations (%.0f MiB in the forward pass), %.1f s "
                 "(first run includes kernel builds)", num_tokens, peak / (1 << 20), forward / (1 << 20),
                 time.monotonic() - started)
        return peak, forward

    # -- one step ------------------------------------------------------------

    def _apply_plan(self, plan: BatchPlan) -> dict[str, int]:
        """Update per-request state from the plan; return each request's start position."""
        for request_id in plan.finished_request_ids:
            self.states.pop(request_id, None)
        start: dict[str, int] = {}
        for new in plan.new_requests:
            state = self.states.get(new.request_id)
            blocks = np.asarray(new.block_ids, dtype=np.int32)
            if state is None:
                sampling = SamplingState(new.sampling, new.token_ids, device=self.device)
                self.states[new.request_id] = RequestState(list(new.token_ids), blocks, sampling)
            else:
                # Resumed after preemption: the sampling state (penalty counts, a
                # seeded generator) carries on; tokens and blocks are replaced.
                state.token_ids = list(new.token_ids)
                state.block_ids = blocks
            start[new.request_id] = new.num_computed_tokens
        for cached in plan.cached_requests:
            state = self.states[cached.request_id]
            if cached.new_block_ids:
                state.block_ids = np.concatenate((state.block_ids, np.asarray(cached.new_block_ids, np.int32)))
            start[cached.request_id] = cached.num_computed_tokens
        return start

    def host_batch(self, plan: BatchPlan, start: dict[str, int]) -> HostBatch:
        """Lay the plan's tokens out on the flattened axis, in host memory.

        Sequences with one new token come first, in plan order, then the others:
        the Triton backend sends leading decodes of a mixed batch to its decode
        kernel.
        """
        bs = self.block_size
        scheduled = plan.num_scheduled_tokens
        order = [rid for rid, n in scheduled.items() if n == 1] + [rid for rid, n in scheduled.items() if n != 1]
        num_seqs = len(order)
        num_tokens = sum(scheduled.values())
        states = [self.states[rid] for rid in order]
        width = max(len(st.block_ids) for st in states)
        # A request that the unfinalized step samples knows one token more than its state holds.
        prev_rows = self._rows_of(self._unfinalized)
        sample_ids = [
            rid for rid, st in zip(order, states, strict=True)
            if start[rid] + scheduled[rid] == len(st.token_ids) + (rid in prev_rows)
        ]
        late: list[tuple[int, int]] = []
        # 16-byte boundaries: 2 int64 or 4 int32 elements.
        row_stride = _aligned(num_tokens, 2)
        seq_lens_at = _aligned(num_seqs + 1, 4)
        block_tables_at = _aligned(seq_lens_at + num_seqs, 4)
        slot = self.staging.take()
        host_i64 = self.staging.buffer(slot, torch.int64, 3 * row_stride + len(sample_ids))
        host_i32 = self.staging.buffer(slot, torch.int32, block_tables_at + num_seqs * width)
        i64, i32 = host_i64.numpy(), host_i32.numpy()
        # numpy's fill, not torch's: above 32K elements torch fills with all its CPU threads,
        # which on a host busy with gateways and clients wait milliseconds for each other.
        i32.fill(0)
        token_data = i64[: 3 * row_stride].reshape(3, row_stride)[:, :num_tokens]
        sample_rows = i64[3 * row_stride :]
        query_start_loc = i32[: num_seqs + 1]
        seq_lens = i32[seq_lens_at : seq_lens_at + num_seqs]
        block_tables = i32[block_tables_at:].reshape(num_seqs, width)

        row = 0
        sampled = 0
        query_start_loc[0] = 0
        for i, (rid, st) in enumerate(zip(order, states, strict=True)):
            begin = start[rid]
            num_new = scheduled[rid]
            end = begin + num_new
            table = st.block_ids
            block_tables[i, : len(table)] = table
            if num_new == 1:  # decodes: scalar writes beat building arrays
                if begin < len(st.token_ids):
                    token_data[0, row] = st.token_ids[begin]
                else:  # sampled by the unfinalized step: filled in on the device
                    token_data[0, row] = 0
                    late.append((row, prev_rows[rid]))
                token_data[1, row] = begin
                token_data[2, row] = int(table[begin // bs]) * bs + begin % bs
            else:
                pos = np.arange(begin, end)
                token_data[0, row : row + num_new] = st.token_ids[begin:end]
                token_data[1, row : row + num_new] = pos
                token_data[2, row : row + num_new] = table[pos // bs].astype(np.int64) * bs + pos % bs
            row += num_new
            query_start_loc[i + 1] = row
            seq_lens[i] = end
            if sampled < len(sample_ids) and sample_ids[sampled] == rid:
                sample_rows[sampled] = row - 1
                sampled += 1
        return HostBatch(
            token_data=token_data,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            sample_rows=sample_rows,
            sample_ids=sample_ids,
            late=late,
            max_query_len=max(scheduled.values()),
            host_i64=host_i64,
            host_i32=host_i32,
            row_stride=row_stride,
            seq_lens_at=seq_lens_at,
            block_tables_at=block_tables_at,
            slot=slot,
        )

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy is queued on the stream; the host does not wait.
        return host.to(self.device, non_blocking=True) if self._pin else host

    def device_inputs(self, batch: HostBatch) -> StepInputs:
        t, b = batch.num_tokens, batch.num_seqs
        i64 = self._to_device(batch.host_i64)
        i32 = self._to_device(batch.host_i32)
        r = batch.row_stride
        meta = AttentionMetadata(
            query_start_loc=i32[: b + 1],
            seq_lens=i32[batch.seq_lens_at : batch.seq_lens_at + b],
            block_tables=i32[batch.block_tables_at :].view(b, -1),
            slot_mapping=i64[2 * r : 2 * r + t],
            max_query_len=batch.max_query_len,
            max_seq_len=int(batch.seq_lens.max()),
            query_start_loc_cpu=batch.query_start_loc.tolist(),
            seq_lens_cpu=batch.seq_lens.tolist(),
        )
        return StepInputs(
            input_ids=i64[:t],
            positions=i64[r : r + t],
            meta=meta,
            sample_rows=None if batch.samples_every_row else i64[3 * r :],
        )

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        host = torch.tensor(copies, dtype=torch.int64).t().contiguous()  # (2, copies): sources, destinations
        index = self._to_device(host.pin_memory() if self._pin else host)
        src, dst = index[0], index[1]
        for cache in self.kv_caches:  # (2, num_blocks, block_size, kv_heads, head_dim)
            if cache.dtype == torch.float8_e4m3fn:
                cache = cache.view(torch.uint8)  # copied as bytes: no FP8 indexing on the CPU
            cache[:, dst] = cache[:, src]

    @staticmethod
    def _rows_of(step: LaunchedStep | None) -> dict[str, int]:
        if step is None:
            return {}
        if step.rows is None:
            step.rows = {rid: i for i, rid in enumerate(step.sample_ids)}
        return step.rows

    def _late_tokens(self, batch: HostBatch) -> LateTokens | None:
        if not batch.late:
            return None
        prev = self._unfinalized
        if prev is None or prev.tokens is None:
            raise RuntimeError("a step takes tokens of an earlier step that sampled none")
        host = torch.tensor(batch.late, dtype=torch.int64).t().contiguous()  # (2, n): rows, rows of prev
        index = self._to_device(host.pin_memory() if self._pin else host)
        return LateTokens(index[0], prev.tokens.index_select(0, index[1]))

    def _forward(self, batch: HostBatch) -> torch.Tensor:
        """Hidden states (S, hidden) of the rows to sample, in ``batch.sample_ids`` order."""
        late = self._late_tokens(batch)
        graphs = self.graphs
        if graphs is not None and self.use_cuda_graphs and batch.samples_every_row:
            bucket = graphs.bucket_for(batch.num_seqs)
            if bucket is not None:
                padded = pad_decode_batch(
                    batch.token_data[0],
                    batch.token_data[1],
                    batch.token_data[2],
                    batch.seq_lens,
                    batch.block_tables,
                    bucket,
                    pin=self._pin,
                )
                return graphs.replay(padded, late)[: batch.num_seqs]
        mixed = self.mixed_graphs
        if mixed is not None and self.use_cuda_graphs:
            bucket = mixed.bucket_for(batch.num_tokens, batch.num_seqs)
            if bucket is not None:
                step = mixed.pad(
                    batch.token_data, batch.query_start_loc, batch.seq_lens, batch.block_tables, bucket, pin=self._pin
                )
                hidden = mixed.replay(step, late)
                if batch.samples_every_row:
                    return hidden[: batch.num_tokens]
                rows = self._to_device(batch.host_i64[3 * batch.row_stride :])
                return hidden[rows]
        inputs = self.device_inputs(batch)
        if late is not None:
            late.fill(inputs.input_ids)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)  # (T, hidden)
        return hidden if inputs.sample_rows is None else hidden[inputs.sample_rows]

    @torch.inference_mode()
    def launch(self, plan: BatchPlan) -> LaunchedStep:
        """Apply ``plan`` and queue its forward pass. The step before may still be
        unfinalized: decodes that continue from its tokens read them on the device."""
        started = time.perf_counter()
        start = self._apply_plan(plan)
        self._copy_blocks(plan.block_copies)
        if not plan.num_scheduled_tokens:
            return LaunchedStep(plan.step_id, [], [], None, started, host_s=time.perf_counter() - started)
        batch = self.host_batch(plan, start)
        hidden = self._forward(batch)
        self.staging.done(batch.slot)
        states = [self.states[rid] for rid in batch.sample_ids]
        return LaunchedStep(plan.step_id, batch.sample_ids, states, hidden, started,
                            host_s=time.perf_counter() - started)

    @torch.inference_mode()
    def sample(self, step: LaunchedStep) -> None:
        """Queue the sampling of a launched step, once the step before is finalized (its
        tokens count in penalties and ``min_tokens``). Rank 0 samples; the tokens go to
        every rank of the group on the device."""
        if self._unfinalized is not None:
            raise RuntimeError(f"step {step.step_id} sampled before step {self._unfinalized.step_id} was finalized")
        began = time.perf_counter()
        hidden, step.hidden = step.hidden, None
        if step.sample_ids:
            assert hidden is not None
            logits = self.model.compute_logits(hidden)  # (S, vocab)
            if self.tp.rank == 0:
                step.pending = sample_async(logits, [st.sampling for st in step.states], self._unseeded)
                tokens = step.pending.tokens
            else:
                tokens = torch.empty(len(step.states), dtype=torch.int64, device=self.device)
            step.tokens = self.tp.broadcast(tokens)
        self._unfinalized = step
        step.host_s += time.perf_counter() - began

    def finalize(self, step: LaunchedStep) -> StepResult:
        """Wait for the step's tokens, append them to their requests, and say what was sampled."""
        if step is not self._unfinalized:
            raise RuntimeError(f"step {step.step_id} finalized out of order")
        began = time.perf_counter()
        self._unfinalized = None
        sampled_ids: list[list[int]] = []
        logprobs: list[list[TokenLogprobs] | None] = []
        wait_s = 0.0
        if step.sample_ids:
            assert step.tokens is not None
            if step.pending is not None:
                out = step.pending.result()
                wait_s = step.pending.wait_s
                token_ids = out.token_ids
                logprobs = [None if lp is None else [lp] for lp in out.logprobs]
            else:
                waited = time.perf_counter()
                host_tokens = step.tokens.tolist()  # the device hands them over: a wait
                wait_s = time.perf_counter() - waited
                token_ids = [int(t) for t in host_tokens]
            for state, token_id in zip(step.states, token_ids, strict=True):
                state.token_ids.append(token_id)
                state.sampling.append_output(token_id)
                sampled_ids.append([token_id])
        return StepResult(
            step_id=step.step_id,
            request_ids=step.sample_ids,
            sampled_token_ids=sampled_ids,
            logprobs=logprobs if any(lp is not None for lp in logprobs) else [],
            forward_ms=(time.perf_counter() - step.started) * 1000.0,
            host_ms=(step.host_s + time.perf_counter() - began - wait_s) * 1000.0,
            wait_ms=wait_s * 1000.0,
        )

    def execute(self, plan: BatchPlan) -> StepResult:
        """One step from plan to tokens on the host, nothing left in flight."""
        step = self.launch(plan)
        self.sample(step)
        return self.finalize(step)
