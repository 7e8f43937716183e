"""The model to load into: every parameter allocated on its device, none initialised."""

from __future__ import annotations

import torch

from loomserve.worker.attention.base import AttentionBackend
from loomserve.worker.layers.ops import LayerOps, default_layer_ops
from loomserve.worker.model_config import ModelConfig
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import SINGLE, TensorParallel


def build_model(
    config: ModelConfig,
    attn_backend: type[AttentionBackend],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    ops: LayerOps | None = None,
    tp: TensorParallel = SINGLE,
) -> LlamaForCausalLM:
    """The model (this rank's part of it, under tensor parallelism) with uninitialised
    parameters allocated directly on ``device``.

    Built on the meta device first, so no time goes into random initialisation
    and no full-size copy crosses from host to device; the loaders then fill
    every parameter in place (``loader.weights.WeightFiller``). ``ops`` defaults to
    the device's (``default_layer_ops``).
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config, attn_backend, ops or default_layer_ops(device), tp)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_rope_cache()
    model.requires_grad_(False)
    if tp.size > 1:
        # The vocabulary is padded to a multiple of the group size; the padding rows
        # get no checkpoint data.
        for param in (*model.embed_tokens.parameters(), *model.lm_head.parameters()):
            param.zero_()
    return model.eval()
