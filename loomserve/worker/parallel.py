"""Tensor parallelism (Megatron-style) for the Llama-shaped models.

A worker group of ``size`` ranks holds one model: every rank keeps a slice of
each large weight and of the KV cache, and the ranks exchange activations at
two points per layer.

* **Column-parallel** projections (q/k/v, gate/up) keep a slice of the output
  features: each rank computes its own heads and its own slice of the MLP's
  intermediate features, with no communication. These are plain :class:`Linear`
  of the local size.
* **Row-parallel** projections (attention output, down) keep the matching slice
  of the input features; each rank's product is a partial sum of the full one,
  so an all-reduce follows (:class:`RowParallelLinear`).
* **Vocabulary-parallel** embedding and LM head keep a contiguous range of the
  vocabulary (padded to a multiple of ``size``): the embedding zeroes the rows
  of ids outside the rank's range and all-reduces, the LM head all-gathers its
  logits (:class:`VocabParallelEmbedding`, :class:`ParallelLMHead`).
* Query heads are split evenly; key/value heads too when there are at least
  as many as ranks, otherwise each one is replicated on ``size / kv_heads``
  ranks (the ranks whose query heads read it), see :meth:`TensorParallel.kv_heads`.

Every projection computes its product through the ``matmul`` it was built with:
``F.linear``, or on a GPU a function that sends one-row inputs to a
matrix-vector kernel (``kernels.gemv.linear``).

With ``size == 1`` the model is built from plain layers and never calls
``torch.distributed``. Weights are loaded slice by slice: :class:`Shard` says
which part of a checkpoint tensor a rank keeps, so no rank holds the whole
model (one checkpoint tensor at a time at most).

The ranks meet through ``torch.distributed`` (NCCL between GPUs, gloo on the
CPU) at a TCP rendezvous address, so they may run on several hosts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# How long a rank waits for the others at start-up and in a collective. A rank
# that dies is noticed sooner: its group launcher stops the others.
_DIST_TIMEOUT = timedelta(minutes=10)

# ``F.linear``'s signature: (input, weight, bias) -> input @ weight.T + bias.
Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


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


class Linear(nn.Linear):
    """``nn.Linear`` whose product is ``matmul`` (``F.linear`` unless told otherwise)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, matmul: Matmul = F.linear) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)


class RowParallelLinear(Linear):
    """:class:`Linear` over this rank's slice of the input features; the partial products
    are summed over the ranks, then the (replicated) bias is added once."""

    def __init__(
        self, local_in_features: int, out_features: int, bias: bool, tp: TensorParallel, matmul: Matmul
    ) -> None:
        super().__init__(local_in_features, out_features, bias, matmul)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.matmul(x, self.weight, None))
        return out if self.bias is None else out + self.bias


def row_parallel_linear(
    in_features: int, out_features: int, bias: bool, tp: TensorParallel, matmul: Matmul = F.linear
) -> Linear:
    """A plain :class:`Linear` for a group of one, else :class:`RowParallelLinear`."""
    if tp.size == 1:
        return Linear(in_features, out_features, bias, matmul)
    return RowParallelLinear(tp.split(in_features, "input features"), out_features, bias, tp, matmul)


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of this rank's vocabulary range; ids outside it give zeros,
    and the all-reduce adds the one rank's row that holds each id."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel) -> None:
        per_rank, shard = tp.vocab_shard(vocab_size)
        super().__init__(per_rank, dim, _weight=torch.empty(per_rank, dim))
        self.tp = tp
        self.vocab_start = shard.start
        self.vocab_len = shard.length

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, dim)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_len)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(Linear):
    """The LM head rows of this rank's vocabulary range; the logits of all ranks are
    gathered, so every rank sees the whole (N, vocab) row."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallel, matmul: Matmul) -> None:
        per_rank, _ = tp.vocab_shard(vocab_size)
        super().__init__(dim, per_rank, False, matmul)
        self.tp = tp
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N, vocab)
        return self.tp.all_gather_last_dim(self.matmul(x, self.weight, None))[..., : self.vocab_size]


def embedding(vocab_size: int, dim: int, tp: TensorParallel) -> nn.Embedding:
    if tp.size == 1:
        # An explicit weight skips nn.Embedding's random init, which on the meta
        # device (see build_model) costs seconds of one-off setup in torch.
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    return VocabParallelEmbedding(vocab_size, dim, tp)


def lm_head(dim: int, vocab_size: int, tp: TensorParallel, matmul: Matmul = F.linear) -> Linear:
    if tp.size == 1:
        return Linear(dim, vocab_size, False, matmul)
    return ParallelLMHead(dim, vocab_size, tp, matmul)
