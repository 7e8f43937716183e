"""Token embedding and LM head, split over the vocabulary in a tensor-parallel group.

Each rank keeps a contiguous range of the vocabulary (``TensorParallel.vocab_shard``:
padded to a multiple of the group size, the last rank's padding rows zero). The
embedding gives zeros for ids outside the rank's range and all-reduces; the LM head
all-gathers its logits, so every rank sees whole rows. A group of one gets the plain
layers (``embedding``, ``lm_head``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.worker.layers.linear import ColumnParallelLinear, Linear, LinearMethod, OutputPart
from loomserve.worker.parallel import TensorParallel


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of this rank's vocabulary range; ids outside it give zeros,
    and the all-reduce adds the one rank's row that holds each id."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel) -> None:
        per_rank, shard = tp.vocab_shard(vocab_size)
        super().__init__(per_rank, dim, _weight=torch.empty(per_rank, dim))
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start = shard.start
        self.vocab_len = shard.length

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, dim)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_len)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(ColumnParallelLinear):
    """The LM head rows of this rank's vocabulary range; the logits of all ranks are
    gathered, so every rank sees the whole (N, vocab) row."""

    def __init__(self, dim: int, vocab_size: int, tp: TensorParallel, method: LinearMethod) -> None:
        per_rank, shard = tp.vocab_shard(vocab_size)
        vocab = OutputPart(vocab_size, shard.start, shard.length)
        super().__init__(dim, (vocab,), False, method, out_features=per_rank)
        self.tp = tp
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N, vocab)
        return self.tp.all_gather_last_dim(self.method.apply(self, x, None))[..., : self.vocab_size]


def embedding(vocab_size: int, dim: int, tp: TensorParallel) -> nn.Embedding:
    if tp.size == 1:
        # An explicit weight skips nn.Embedding's random init, which on the meta
        # device (``loader.build``) costs seconds of one-off setup in torch.
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    return VocabParallelEmbedding(vocab_size, dim, tp)


def lm_head(dim: int, vocab_size: int, tp: TensorParallel, method: LinearMethod) -> Linear:
    if tp.size == 1:
        return Linear(dim, vocab_size, False, method)
    return ParallelLMHead(dim, vocab_size, tp, method)
