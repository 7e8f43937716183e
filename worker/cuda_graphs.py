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

Prefill and mixed batches, and decode batches above the largest bucket, run
eagerly in the model runner.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.attention.base import AttentionMetadata
from worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

# Powers of two up to 8, then every multiple of 8: at most 7 padding rows above 8.
DECODE_BUCKETS: tuple[int, ...] = (1, 2, 4, *range(8, 257, 8))

PAD_TOKEN_ID = 0
PAD_POSITION = 0
PAD_SLOT = -1
PAD_SEQ_LEN = 1
PAD_BLOCK = 0

_PROGRESS_SECONDS = 5.0


def bucket_for(num_seqs: int, buckets: Sequence[int]) -> int | None:
    """The smallest of the sorted ``buckets`` that holds ``num_seqs`` rows; None above the largest."""
    i = bisect.bisect_left(buckets, num_seqs)
    return buckets[i] if i < len(buckets) else None


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


class DecodeGraphs:
    """Static decode inputs and one captured graph per bucket.

    ``max_seq_len`` bounds every sequence it will see (it sizes the block-table
    buffer and picks the decode kernel's split count, see the module
    docstring). On a CPU (no ``capture``) it still runs the padded batch
    eagerly, which is how the padding is tested without a GPU.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        *,
        max_seq_len: int,
        block_size: int,
        buckets: Sequence[int] = DECODE_BUCKETS,
    ) -> None:
        if not buckets:
            raise ValueError("no decode batch sizes to capture")
        self.model = model
        self.kv_caches = kv_caches
        self.max_seq_len = max_seq_len
        self.buckets = sorted(set(buckets))
        self.device = kv_caches[0].device
        largest = self.buckets[-1]
        width = -(-max_seq_len // block_size)
        dev = self.device
        self.token_data = torch.zeros((3, largest), dtype=torch.int64, device=dev)
        self.token_data[2].fill_(PAD_SLOT)
        self.seq_lens = torch.full((largest,), PAD_SEQ_LEN, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((largest, width), PAD_BLOCK, dtype=torch.int32, device=dev)
        # Every row is one token, padding included, so this never changes.
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    @property
    def largest(self) -> int:
        return self.buckets[-1]

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

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
        """Copy ``batch`` into the static buffers, queued on the current stream."""
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
                    log.info("capturing CUDA graphs: %d/%d batch sizes, %.1f s",
                             i + 1, len(self.buckets), now - started)
                    last_log = now
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info(
            "captured %d CUDA graphs of decode steps (batch sizes %d to %d) in %.1f s, using %.0f MiB",
            len(self.buckets),
            self.buckets[0],
            self.largest,
            time.monotonic() - started,
            used / (1 << 20),
        )

    def replay(self, batch: PaddedDecode) -> torch.Tensor:  # (bucket, hidden), valid until the next replay
        """Run ``batch`` through its bucket's graph; rows past ``batch.num_seqs`` are padding."""
        self._load(batch)
        self._graphs[batch.bucket].replay()
        self.num_replays += 1
        return self._outputs[batch.bucket]

    @torch.inference_mode()
    def run_eager(self, batch: PaddedDecode) -> torch.Tensor:  # (bucket, hidden)
        """The same padded computation without a graph: the graph's reference."""
        self._load(batch)
        return self._forward(batch.bucket)
