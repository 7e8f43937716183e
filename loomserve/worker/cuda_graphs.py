"""CUDA graphs of decode steps, one per padded batch size (a "bucket").

A decode step launches about ten kernels per layer, each of which runs for a few
microseconds on the GPU but costs more than that in Python and the driver to
launch: eager decode of a small model is bound by the host. A CUDA graph
records one step's launches at start-up and replays them with one call.

A graph replays fixed kernels on fixed addresses, hence:

* Inputs live in static device buffers, sized for the largest bucket and shared
  by every graph. A step copies its inputs into them (non-blocking, from pinned
  host memory, ordered before the replay on the same stream).
* A batch of ``n`` sequences replays the graph of the smallest bucket ``>= n``.
  Rows ``n..bucket-1`` are padding: token 0 at position 0, slot -1 (nothing is
  written to the KV cache), context length 1 over a block-table row of zeros.
  They read slot 0 of block 0 (any finite value) so that every backend computes
  finite rows; nobody reads their results. Length 0 would do for the Triton
  kernels but gives NaN rows in the torch reference, whose softmax would be
  over nothing.
* Whatever a launch derives from host values is frozen at capture. In the
  decode path that is only the attention kernel's split count, which
  ``kernels.paged_decode_attention`` picks from the batch size and
  ``max_seq_len``; graphs are captured with ``max_seq_len`` set to the longest
  sequence the cache holds, so that long contexts get enough splits. The
  kernel's results do not depend on the split count (each sequence derives its
  split length from its own length on the device).
* The attention backend's decode path must neither synchronise with the host
  nor size anything from device values: ``TritonAttentionBackend`` qualifies;
  the torch backend (which reads the slot mapping on the host) does not, and is
  only run here eagerly (``run_eager``), as the tests do on the CPU.

Decode graphs are captured for batches of up to ``--cuda-graph-max-seqs``
sequences (``decode_buckets``). Prefill and mixed batches replay graphs of
``MixedGraphs``, one per padded token count, when they fit its largest bucket
(``--cuda-graph-max-tokens``) and as many sequences. What varies from step to
step there beyond the token rows (how many of the sequences are decodes, how
many query blocks each prompt chunk has) goes to the attention backend as a
``StaticLayout`` of fixed-size device tensors: the decode kernel runs over a
fixed number of leading rows (those past the step's decodes have context
length 0) and the prefill kernel over a fixed-size work list of (sequence,
query block) pairs. Padding token rows are token 0 at position 0 with slot -1
and belong to no sequence; their attention output is zero. Larger steps run
eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

from loomserve.worker.attention.base import AttentionMetadata, StaticLayout
from loomserve.worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

# Most sequences in a step replayed from a graph unless told otherwise: decode batch
# sizes and the sequence-indexed buffers of mixed steps are sized for it.
GRAPH_MAX_SEQS = 256
# Token counts of mixed steps: powers of two up to 256, then steps of 128 to 1024 and
# of 256 beyond, so that padding stays under a third of a step above 256 tokens.
MIXED_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, *range(384, 1025, 128), *range(1280, 8193, 256))

PAD_TOKEN_ID = 0
PAD_POSITION = 0
PAD_SLOT = -1
PAD_SEQ_LEN = 1
PAD_BLOCK = 0

_PROGRESS_SECONDS = 5.0


def decode_buckets(max_seqs: int) -> tuple[int, ...]:
    """Batch sizes of decode graphs for up to ``max_seqs`` sequences: powers of two up to
    8, every multiple of 8 up to 256 (at most 7 padding rows) and of 16 beyond (at most 15,
    under 6% of a batch), ending at the first size that holds ``max_seqs``."""
    if max_seqs < 1:
        raise ValueError(f"decode graphs need at least 1 sequence, got {max_seqs}")
    sizes = [1, 2, 4, *range(8, 257, 8)]
    if max_seqs > 256:
        sizes += range(272, max_seqs + 16, 16)
    return tuple(sizes[: bisect.bisect_left(sizes, max_seqs) + 1])


DECODE_BUCKETS = decode_buckets(GRAPH_MAX_SEQS)


def bucket_for(num_seqs: int, buckets: Sequence[int]) -> int | None:
    """The smallest of the sorted ``buckets`` that holds ``num_seqs`` rows; None above the largest."""
    i = bisect.bisect_left(buckets, num_seqs)
    return buckets[i] if i < len(buckets) else None


@dataclass
class LateTokens:
    """Input tokens that the host has not seen yet: a step's decodes that continue from
    tokens the step before samples (asynchronous scheduling). After the step's inputs
    are copied in, row ``rows[i]`` of its input ids takes ``values[i]``, gathered on the
    device from the earlier step's sampled tokens."""

    rows: torch.Tensor  # (n,) int64 on the device: rows of the step's flattened token axis
    values: torch.Tensor  # (n,) int64 on the device

    def fill(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.rows, self.values)


class _Padded(Protocol):
    @property
    def bucket(self) -> int: ...


BatchT = TypeVar("BatchT", bound=_Padded)


class _GraphSet(ABC, Generic[BatchT]):
    """One captured graph per bucket over static input buffers: what decode and mixed
    steps share. A subclass sizes its buffers, copies a batch into them (``_load``) and
    runs the model over them (``_forward``)."""

    kind: str  # "decode steps" or "mixed steps", for the logs
    token_data: torch.Tensor  # (3, largest) int64 static inputs: input ids, positions, slot mapping

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], buckets: Sequence[int]) -> None:
        if not buckets:
            raise ValueError(f"no sizes of {self.kind} to capture")
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = sorted(set(buckets))
        self.device = kv_caches[0].device
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    @property
    def largest(self) -> int:
        return self.buckets[-1]

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    @abstractmethod
    def _forward(self, bucket: int) -> torch.Tensor:  # (bucket, hidden)
        """The model over the static buffers' first ``bucket`` rows."""

    @abstractmethod
    def _load(self, batch: BatchT) -> None:
        """Copy ``batch`` into the static buffers, queued on the current stream."""

    @abstractmethod
    def _describe_sizes(self) -> str:
        """The captured sizes, for the log line."""

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first, all in one memory pool."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device}")
        started = last_log = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        stream = torch.cuda.Stream(self.device)
        pool = torch.cuda.graph_pool_handle()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for i, bucket in enumerate(reversed(self.buckets)):
                # One eager run first: it compiles this shape's Triton variants and sets
                # up cuBLAS, neither of which may happen during a capture.
                self._forward(bucket)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._outputs[bucket] = self._forward(bucket)
                self._graphs[bucket] = graph
                now = time.monotonic()
                if now - last_log >= _PROGRESS_SECONDS:
                    log.info("capturing CUDA graphs of %s: %d/%d sizes, %.1f s",
                             self.kind, i + 1, len(self.buckets), now - started)
                    last_log = now
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info("captured %d CUDA graphs of %s (%s) in %.1f s, using %.0f MiB", len(self.buckets), self.kind,
                 self._describe_sizes(), time.monotonic() - started, used / (1 << 20))

    def replay(self, batch: BatchT, late: LateTokens | None = None) -> torch.Tensor:
        """Run ``batch`` through its bucket's graph: (bucket, hidden), valid until the next
        replay; rows past its real ones are padding. ``late`` fills input ids on the device."""
        self._load(batch)
        if late is not None:
            late.fill(self.token_data[0])
        self._graphs[batch.bucket].replay()
        self.num_replays += 1
        return self._outputs[batch.bucket]

    @torch.inference_mode()
    def run_eager(self, batch: BatchT, late: LateTokens | None = None) -> torch.Tensor:  # (bucket, hidden)
        """The same padded computation without a graph: the graph's reference."""
        self._load(batch)
        if late is not None:
            late.fill(self.token_data[0])
        return self._forward(batch.bucket)


@dataclass
class PaddedDecode:
    """One decode batch padded to a bucket, in host memory (pinned when bound for a GPU)."""

    token_data: torch.Tensor  # (3, bucket) int64: input ids, positions, slot mapping
    seq_lens: torch.Tensor  # (bucket,) int32
    block_tables: torch.Tensor  # (bucket, width) int32
    num_seqs: int  # real rows; the rest are padding

    @property
    def bucket(self) -> int:
        return int(self.seq_lens.shape[0])


def pad_decode_batch(
    input_ids: np.ndarray,  # (n,) int64
    positions: np.ndarray,  # (n,) int64
    slot_mapping: np.ndarray,  # (n,) int64
    seq_lens: np.ndarray,  # (n,) int32
    block_tables: np.ndarray,  # (n, width) int32
    bucket: int,
    *,
    pin: bool,
) -> PaddedDecode:
    """The batch's rows followed by ``bucket - n`` padding rows (see the module docstring)."""
    n = int(input_ids.shape[0])
    if n > bucket:
        raise ValueError(f"a decode batch of {n} sequences does not fit the bucket of {bucket}")
    width = int(block_tables.shape[1])
    token_data = torch.empty((3, bucket), dtype=torch.int64, pin_memory=pin)
    lens = torch.empty(bucket, dtype=torch.int32, pin_memory=pin)
    tables = torch.empty((bucket, width), dtype=torch.int32, pin_memory=pin)
    t, ln, tb = token_data.numpy(), lens.numpy(), tables.numpy()
    t[0, :n], t[1, :n], t[2, :n] = input_ids, positions, slot_mapping
    t[0, n:], t[1, n:], t[2, n:] = PAD_TOKEN_ID, PAD_POSITION, PAD_SLOT
    ln[:n], ln[n:] = seq_lens, PAD_SEQ_LEN
    tb[:n], tb[n:] = block_tables, PAD_BLOCK
    return PaddedDecode(token_data, lens, tables, n)


class DecodeGraphs(_GraphSet[PaddedDecode]):
    """Static decode inputs and one captured graph per bucket.

    ``max_seq_len`` bounds every sequence it will see (it sizes the block-table
    buffer and picks the decode kernel's split count, see the module
    docstring). On a CPU (no ``capture``) it still runs the padded batch
    eagerly, which is how the padding is tested without a GPU.
    """

    kind = "decode steps"

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        *,
        max_seq_len: int,
        block_size: int,
        buckets: Sequence[int] = DECODE_BUCKETS,
    ) -> None:
        super().__init__(model, kv_caches, buckets)
        self.max_seq_len = max_seq_len
        largest = self.largest
        width = -(-max_seq_len // block_size)
        dev = self.device
        self.token_data = torch.zeros((3, largest), dtype=torch.int64, device=dev)
        self.token_data[2].fill_(PAD_SLOT)
        self.seq_lens = torch.full((largest,), PAD_SEQ_LEN, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((largest, width), PAD_BLOCK, dtype=torch.int32, device=dev)
        # Every row is one token, padding included, so this never changes.
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=dev)

    def bucket_for(self, num_seqs: int) -> int | None:
        return bucket_for(num_seqs, self.buckets)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        """Metadata over the static buffers' first ``bucket`` rows. A new object per
        call: the torch backend caches its per-batch plan by metadata identity."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.token_data[2, :bucket],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=list(range(bucket + 1)),
            seq_lens_cpu=[self.max_seq_len] * bucket,
        )

    def _forward(self, bucket: int) -> torch.Tensor:  # (bucket, hidden)
        return self.model(
            self.token_data[0, :bucket], self.token_data[1, :bucket], self.kv_caches, self._metadata(bucket)
        )

    def _load(self, batch: PaddedDecode) -> None:
        bucket, width = batch.bucket, int(batch.block_tables.shape[1])
        if width > self.block_tables.shape[1]:
            raise ValueError(
                f"block tables of {width} blocks exceed the {self.block_tables.shape[1]} sized for "
                f"max_seq_len {self.max_seq_len}"
            )
        self.token_data[:, :bucket].copy_(batch.token_data, non_blocking=True)
        self.seq_lens[:bucket].copy_(batch.seq_lens, non_blocking=True)
        # Columns past ``width`` keep stale ids; no sequence is long enough to read them.
        self.block_tables[:bucket, :width].copy_(batch.block_tables, non_blocking=True)

    def _describe_sizes(self) -> str:
        return f"batch sizes {self.buckets[0]} to {self.largest}"


def mixed_buckets(max_tokens: int) -> tuple[int, ...]:
    """``MIXED_BUCKETS`` up to ``max_tokens``, which is always one of them (none for 0)."""
    if max_tokens < 0:
        raise ValueError(f"the largest mixed step must be >= 0 tokens, got {max_tokens}")
    if max_tokens == 0:
        return ()
    return (*(b for b in MIXED_BUCKETS if b < max_tokens), max_tokens)


def _align4(n: int) -> int:
    """``n`` rounded up to a multiple of 4 int32 elements: 16-byte aligned views."""
    return -(-n // 4) * 4


@dataclass
class PaddedStep:
    """One prefill or mixed batch padded to a bucket of ``MixedGraphs``, in host memory."""

    token_data: torch.Tensor  # (3, bucket) int64: input ids, positions, slot mapping
    index: torch.Tensor  # int32, laid out as MixedGraphs.index
    block_tables: torch.Tensor  # (num_seqs, width) int32
    num_tokens: int  # real rows; the rest are padding

    @property
    def bucket(self) -> int:
        return int(self.token_data.shape[1])


class MixedGraphs(_GraphSet[PaddedStep]):
    """Static inputs and one captured graph per token bucket, for any batch of at
    most ``max_seqs`` sequences (see the module docstring).

    The sequence-indexed inputs share one int32 device buffer, ``index``, filled
    by one copy a step: query start offsets (``max_seqs + 1``), context lengths
    (``max_seqs``), the context lengths of the leading decodes (``max_seqs``) and
    the prefill work list (2 rows of the largest bucket's size), each at a 16-byte
    boundary. Each bucket's graph uses a prefix of the decode lengths and of the
    work list, sized by ``layout``.
    """

    kind = "mixed steps"

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        *,
        max_seq_len: int,
        block_size: int,
        buckets: Sequence[int] = MIXED_BUCKETS,
        max_seqs: int = GRAPH_MAX_SEQS,
    ) -> None:
        # Imported here: triton is an optional dependency that only GPU hosts need.
        from loomserve.kernels.paged_prefill_attention import fill_work_list, prefill_block_tokens, work_list_size

        super().__init__(model, kv_caches, buckets)
        self._fill_work_list = fill_work_list
        self.max_seq_len = max_seq_len
        self.max_seqs = max_seqs
        dev = self.device
        head_dim, dtype = model.config.head_dim, model.embed_tokens.weight.dtype
        # This rank's query heads per KV head (KV heads may be replicated across ranks).
        group = model.config.num_heads // model.tp.size // model.num_kv_heads
        # bucket -> (decode rows D, new tokens per work item, work list size G)
        self.layout: dict[int, tuple[int, int, int]] = {}
        for bucket in self.buckets:
            block_tokens = prefill_block_tokens(head_dim, bucket, dtype, group=group)
            self.layout[bucket] = (min(bucket, max_seqs), block_tokens, work_list_size(bucket, max_seqs, block_tokens))
        self.work_size = _align4(max(g for _, _, g in self.layout.values()))
        self.seq_lens_at = _align4(max_seqs + 1)
        self.decode_at = self.seq_lens_at + _align4(max_seqs)
        self.work_at = self.decode_at + _align4(max_seqs)
        self.token_data = torch.zeros((3, self.largest), dtype=torch.int64, device=dev)
        self.token_data[2].fill_(PAD_SLOT)
        self.index = torch.zeros(self.work_at + 2 * self.work_size, dtype=torch.int32, device=dev)
        self.index[self.work_at :].fill_(-1)
        self.block_tables = torch.zeros((max_seqs, -(-max_seq_len // block_size)), dtype=torch.int32, device=dev)

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        """The bucket of a batch, None when it has too many tokens or sequences."""
        if num_seqs > self.max_seqs:
            return None
        return bucket_for(num_tokens, self.buckets)

    def pad(
        self,
        token_data: np.ndarray,  # (3, T) int64: input ids, positions, slot mapping
        query_start_loc: np.ndarray,  # (B + 1,) int32
        seq_lens: np.ndarray,  # (B,) int32
        block_tables: np.ndarray,  # (B, width) int32
        bucket: int,
        *,
        pin: bool,
    ) -> PaddedStep:
        """The batch laid out for ``bucket``'s graph. Sequences with one new token
        must come first (the model runner orders batches so)."""
        num_tokens, num_seqs = int(token_data.shape[1]), int(seq_lens.shape[0])
        if num_tokens > bucket or num_seqs > self.max_seqs:
            raise ValueError(
                f"a batch of {num_tokens} tokens over {num_seqs} sequences does not fit the bucket of "
                f"{bucket} tokens and {self.max_seqs} sequences"
            )
        _, block_tokens, work_size = self.layout[bucket]
        padded = torch.empty((3, bucket), dtype=torch.int64, pin_memory=pin)
        index = torch.empty(self.work_at + 2 * self.work_size, dtype=torch.int32, pin_memory=pin)
        tables = torch.from_numpy(np.ascontiguousarray(block_tables))
        if pin:
            tables = tables.pin_memory()
        t, ix = padded.numpy(), index.numpy()
        t[:, :num_tokens] = token_data
        t[0, num_tokens:], t[1, num_tokens:], t[2, num_tokens:] = PAD_TOKEN_ID, PAD_POSITION, PAD_SLOT
        ix[: num_seqs + 1] = query_start_loc
        ix[num_seqs + 1 : self.seq_lens_at] = num_tokens  # empty sequences past the batch
        ix[self.seq_lens_at : self.seq_lens_at + num_seqs] = seq_lens
        ix[self.seq_lens_at + num_seqs : self.decode_at] = 0
        q_lens = np.diff(query_start_loc)
        not_decode = np.flatnonzero(q_lens != 1)
        num_decodes = int(not_decode[0]) if len(not_decode) else num_seqs
        decode = ix[self.decode_at : self.work_at]
        decode[:num_decodes] = seq_lens[:num_decodes]
        decode[num_decodes:] = 0
        work = ix[self.work_at :].reshape(2, self.work_size)
        self._fill_work_list(query_start_loc, num_decodes, block_tokens, work[:, :work_size])
        work[:, work_size:] = -1
        return PaddedStep(padded, index, tables, num_tokens)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        """Metadata over the static buffers for ``bucket``; its host lists are empty
        (the Triton backend reads ``static`` instead)."""
        num_decodes_cap, block_tokens, work_size = self.layout[bucket]
        ix, s = self.index, self.max_seqs
        work = ix[self.work_at :].view(2, self.work_size)[:, :work_size]
        return AttentionMetadata(
            query_start_loc=ix[: s + 1],
            seq_lens=ix[self.seq_lens_at : self.seq_lens_at + s],
            block_tables=self.block_tables,
            slot_mapping=self.token_data[2, :bucket],
            max_query_len=bucket,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
            static=StaticLayout(
                decode_seq_lens=ix[self.decode_at : self.decode_at + num_decodes_cap],
                prefill_work=work,
                prefill_block_tokens=block_tokens,
            ),
        )

    def _forward(self, bucket: int) -> torch.Tensor:  # (bucket, hidden)
        return self.model(
            self.token_data[0, :bucket], self.token_data[1, :bucket], self.kv_caches, self._metadata(bucket)
        )

    def _load(self, step: PaddedStep) -> None:
        num_seqs, width = step.block_tables.shape
        if width > self.block_tables.shape[1]:
            raise ValueError(
                f"block tables of {width} blocks exceed the {self.block_tables.shape[1]} sized for "
                f"max_seq_len {self.max_seq_len}"
            )
        self.token_data[:, : step.bucket].copy_(step.token_data, non_blocking=True)
        self.index.copy_(step.index, non_blocking=True)
        # Rows and columns past the batch keep stale ids that no launch reads.
        self.block_tables[:num_seqs, :width].copy_(step.block_tables, non_blocking=True)

    def _describe_sizes(self) -> str:
        return f"{self.buckets[0]} to {self.largest} tokens, up to {self.max_seqs} sequences"
