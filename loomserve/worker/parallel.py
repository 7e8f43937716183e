"""Tensor parallelism (Megatron-style): a rank's place in its group, and the collectives.

A worker group of ``size`` ranks holds one model: every rank keeps a slice of
each large weight and of the KV cache, and the ranks exchange activations at
two points per layer. The layers that split the work are in ``worker.layers``:

* **Column-parallel** projections (q/k/v, gate/up; ``layers.linear``) keep a
  slice of the output features: each rank computes its own heads and its own
  slice of the MLP's intermediate features, with no communication.
* **Row-parallel** projections (attention output, down) keep the matching slice
  of the input features; each rank's product is a partial sum of the full one,
  so an all-reduce follows.
* **Vocabulary-parallel** embedding and LM head (``layers.embedding``) keep a
  contiguous range of the vocabulary (padded to a multiple of ``size``): the
  embedding zeroes the rows of ids outside the rank's range and all-reduces, the
  LM head all-gathers its logits.
* Query heads are split evenly; key/value heads too when there are at least
  as many as ranks, otherwise each one is replicated on ``size / kv_heads``
  ranks (the ranks whose query heads read it), see :meth:`TensorParallel.kv_heads`.

With ``size == 1`` the model is built from plain layers and never calls
``torch.distributed``. Weights are loaded slice by slice: :class:`Shard` says
which part of a checkpoint tensor a rank keeps (``worker.loader.weights``), so
no rank holds the whole model (one checkpoint tensor at a time at most).

The ranks meet through ``torch.distributed`` (NCCL between GPUs, gloo on the
CPU) at a TCP rendezvous address, so they may run on several hosts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# How long a rank waits for the others at start-up and in a collective. A rank
# that dies is noticed sooner: its group launcher stops the others.
_DIST_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Shard:
    """The part of a full (checkpoint) tensor one rank keeps: ``length`` entries from
    ``start`` along ``dim``."""

    dim: int
    start: int
    length: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(self.dim, self.start, self.length)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group; ``group`` is None for a group of one."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def split(self, n: int, what: str) -> int:
        """This rank's share of ``n`` (heads, features), which must divide evenly."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        return n // self.size

    def even_shard(self, n: int, what: str, dim: int = 0) -> Shard:
        local = self.split(n, what)
        return Shard(dim, self.rank * local, local)

    def kv_heads(self, num_kv_heads: int, num_heads: int) -> tuple[int, int]:
        """(key/value heads on this rank, index of the first). With fewer KV heads than
        ranks, rank r holds the one KV head its query heads belong to."""
        self.split(num_heads, "num_heads")
        if num_kv_heads >= self.size:
            local = self.split(num_kv_heads, "num_kv_heads")
            return local, self.rank * local
        if self.size % num_kv_heads:
            raise ValueError(
                f"tensor-parallel size {self.size} is neither a divisor nor a multiple of num_kv_heads ({num_kv_heads})"
            )
        return 1, self.rank * num_kv_heads // self.size

    def vocab_shard(self, vocab_size: int) -> tuple[int, Shard]:
        """(rows per rank, the checkpoint rows this rank keeps). The vocabulary is padded to
        a multiple of ``size``; the last rank's padding rows stay zero."""
        per_rank = -(-vocab_size // self.size)
        start = min(self.rank * per_rank, vocab_size)
        return per_rank, Shard(0, start, min(per_rank, vocab_size - start))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) on every rank -> (..., size * n), rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_min(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' ``value``s."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x


SINGLE = TensorParallel()


def init_tensor_parallel(rank: int, size: int, init_address: str, device: torch.device) -> TensorParallel:
    """Join the group at ``init_address`` (host:port of the rendezvous; rank 0 listens there)."""
    if size == 1:
        return SINGLE
    backend = "nccl" if device.type == "cuda" else "gloo"
    log.info("rank %d/%d joining the worker group at %s (%s)", rank, size, init_address, backend)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{init_address}",
        rank=rank,
        world_size=size,
        timeout=_DIST_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    tp = TensorParallel(rank, size, dist.group.WORLD)
    # One collective now: every rank is up, and NCCL builds its communicator
    # before CUDA graphs are captured.
    tp.all_reduce(torch.ones(1, device=device))
    return tp


def destroy_tensor_parallel(tp: TensorParallel) -> None:
    """Leave the group before the process exits. A gloo group must be destroyed: its
    threads otherwise abort the exiting process ("terminate called without an active
    exception"). An NCCL group is left to the end of the process: destroying one whose
    collectives live in CUDA graphs hung on an H200 host."""
    if tp.size > 1 and dist.is_initialized() and dist.get_backend(tp.group) == "gloo":
        dist.destroy_process_group()
