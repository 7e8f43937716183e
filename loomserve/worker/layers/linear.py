"""Linear layers, and the linear methods that hold their weights and compute their products.

A layer (:class:`Linear` and its tensor-parallel forms) owns the shapes, the bias
and the communication; its :class:`LinearMethod` owns the weight: which
parameters hold it and how ``x @ W.T`` is computed from them. A quantisation
scheme is a method, so neither the model nor the parallel layers change with it
(where gpt-fast swaps ``nn.Linear`` for a quantised module, the layers here stay
and their method changes).

Under tensor parallelism (``worker.parallel``):

* :class:`ColumnParallelLinear` computes this rank's slice of the output features of
  each projection fused into it (its ``parts``), with no communication;
* :class:`RowParallelLinear` holds the matching slice of the input features: its
  product is a partial sum, all-reduced over the ranks before the bias is added once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.worker.parallel import TensorParallel

# ``F.linear``'s signature: (input, weight, bias) -> input @ weight.T + bias.
Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class WeightAxes:
    """The axes of a linear layer's parameter that run over its output and its input
    features; ``input`` is None for a parameter without one (a bias)."""

    output: int
    input: int | None


class LinearMethod(ABC):
    """How a linear layer stores its weight and computes ``x @ W.T + bias``.

    A method (a quantisation scheme, say) provides:

    * ``create_weights(layer, in_features, out_features)``: register on ``layer``, with
      :meth:`Linear.add_weight`, the parameters that hold this rank's
      ``(out_features, in_features)`` weight, each with its :class:`WeightAxes`.
      The loaders fill a parameter named ``qweight`` from the checkpoint tensors
      named ``<projection>.qweight``, in place and laid out as the parameter is
      (``worker.loader.weights``); under ``--tp`` they cut each tensor along its
      axes: a column-parallel layer keeps its parts' ranges of the output axis
      (which must hold one entry per output feature), a row-parallel one its even
      share of the input axis (entries may pack or group several features;
      parameters without an input axis are kept whole there). Floating-point
      parameters are cast to the model's dtype, integer ones keep theirs.
    * ``apply(layer, x, bias)``: ``x`` (T, in_features) in the model's dtype;
      return ``x @ W.T + bias`` (T, out_features) in that dtype. ``bias``
      (out_features,) may be None: a row-parallel layer adds its own after the
      all-reduce. ``apply`` runs inside CUDA graph captures: no host
      synchronisation, nothing sized from device values.

    One instance serves every layer of a model; it keeps nothing per layer.
    """

    @abstractmethod
    def create_weights(self, layer: Linear, in_features: int, out_features: int) -> None:
        """Register the parameters of ``layer``'s weight (see the class docstring)."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias``: (T, in_features) -> (T, out_features)."""


class UnquantizedLinearMethod(LinearMethod):
    """A plain ``weight`` (out_features, in_features) in the model's dtype, multiplied by
    ``matmul`` (``F.linear`` unless told otherwise)."""

    def __init__(self, matmul: Matmul = F.linear) -> None:
        self.matmul = matmul

    def create_weights(self, layer: Linear, in_features: int, out_features: int) -> None:
        layer.add_weight("weight", torch.empty(out_features, in_features), WeightAxes(output=0, input=1))

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.matmul(x, cast(torch.Tensor, layer.weight), bias)


class GemvLinearMethod(UnquantizedLinearMethod):
    """:class:`UnquantizedLinearMethod` whose one-row products (a batch-1 decode step) go
    to ``kernels.gemv``, where a matrix-multiply tile would be mostly padding."""

    def __init__(self) -> None:
        # Imported here, not at the top: triton is an optional dependency that only models
        # built for a GPU need.
        from loomserve.kernels.gemv import linear

        super().__init__(linear)


class Linear(nn.Module):
    """``x @ W.T + bias`` over the whole weight (nothing split); ``method`` holds ``W``."""

    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool, method: LinearMethod) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.method = method
        self.weight_axes: dict[str, WeightAxes] = {}
        method.create_weights(self, in_features, out_features)
        if bias:
            self.add_weight("bias", torch.empty(out_features), WeightAxes(output=0, input=None))
        else:
            self.register_parameter("bias", None)

    def add_weight(self, name: str, data: torch.Tensor, axes: WeightAxes) -> None:
        """Register parameter ``name`` (no gradient: integer weights cannot have one) with its axes."""
        self.register_parameter(name, nn.Parameter(data, requires_grad=False))
        self.weight_axes[name] = axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, in_features) -> (T, out_features)
        return self.method.apply(self, x, self.bias)


@dataclass(frozen=True)
class OutputPart:
    """One projection fused into a column-parallel layer (q, k or v; gate or up): ``size``
    output features in all, of which this rank computes ``length`` from ``start``."""

    size: int
    start: int
    length: int


class ColumnParallelLinear(Linear):
    """:class:`Linear` over this rank's slice of the output features: its ``parts``' slices,
    in order. No communication. ``out_features`` beyond the parts' total are padding rows
    that no checkpoint fills (the last rank's share of a padded vocabulary)."""

    def __init__(
        self,
        in_features: int,
        parts: Sequence[OutputPart],
        bias: bool,
        method: LinearMethod,
        out_features: int | None = None,
    ) -> None:
        total = sum(part.length for part in parts)
        super().__init__(in_features, total if out_features is None else out_features, bias, method)
        self.parts = tuple(parts)


def even_parts(sizes: Sequence[int], tp: TensorParallel, what: str) -> tuple[OutputPart, ...]:
    """Each of ``sizes`` split evenly over the ranks."""
    shards = [tp.even_shard(n, what) for n in sizes]
    return tuple(OutputPart(n, shard.start, shard.length) for n, shard in zip(sizes, shards, strict=True))


def qkv_parts(num_heads: int, num_kv_heads: int, head_dim: int, tp: TensorParallel) -> tuple[OutputPart, ...]:
    """This rank's query heads, then the key and value heads they read (see
    :meth:`TensorParallel.kv_heads`)."""
    heads = tp.split(num_heads, "num_heads")
    kv_heads, first_kv = tp.kv_heads(num_kv_heads, num_heads)
    kv = OutputPart(num_kv_heads * head_dim, first_kv * head_dim, kv_heads * head_dim)
    return OutputPart(num_heads * head_dim, tp.rank * heads * head_dim, heads * head_dim), kv, kv


class RowParallelLinear(Linear):
    """:class:`Linear` over this rank's slice of the ``in_features``; the partial products
    are summed over the ranks, then the (replicated) bias is added once."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, method: LinearMethod
    ) -> None:
        super().__init__(tp.split(in_features, "input features"), out_features, bias, method)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, local in_features) -> (T, out_features)
        out = self.tp.all_reduce(self.method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


def row_parallel_linear(
    in_features: int, out_features: int, bias: bool, tp: TensorParallel, method: LinearMethod
) -> Linear:
    """A plain :class:`Linear` for a group of one (the bias added in the product, as the
    reference models add it), else :class:`RowParallelLinear`."""
    if tp.size == 1:
        return Linear(in_features, out_features, bias, method)
    return RowParallelLinear(in_features, out_features, bias, tp, method)
