"""Which implementation of each layer a model is built with: ``LayerOps``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loomserve.worker.layers.activation import SiluAndMul, TritonSiluAndMul
from loomserve.worker.layers.linear import GemvLinearMethod, LinearMethod, UnquantizedLinearMethod
from loomserve.worker.layers.norm import RMSNorm, TritonRMSNorm
from loomserve.worker.layers.rotary import Rotary, TritonRotary


@dataclass(frozen=True)
class LayerOps:
    """The layer classes of the model's elementwise stages, and the linear method of its
    projections (``linear()`` is called once per model; the method serves every layer).

    Picked once at construction, so the forward passes never branch on the device:
    plain torch on the CPU (``TORCH_OPS``), the fused Triton kernels of ``kernels/`` on
    a GPU (``TRITON_OPS``, whose linear method sends one-row inputs, a batch-1 decode
    step, to the matrix-vector kernel).
    """

    norm: type[RMSNorm]
    rotary: type[Rotary]
    activation: type[SiluAndMul]
    linear: Callable[[], LinearMethod]


TORCH_OPS = LayerOps(norm=RMSNorm, rotary=Rotary, activation=SiluAndMul, linear=UnquantizedLinearMethod)
TRITON_OPS = LayerOps(
    norm=TritonRMSNorm, rotary=TritonRotary, activation=TritonSiluAndMul, linear=GemvLinearMethod
)


def default_layer_ops(device: str | torch.device) -> LayerOps:
    """The fused Triton stages on a GPU, plain torch elsewhere."""
    return TRITON_OPS if torch.device(device).type == "cuda" else TORCH_OPS
