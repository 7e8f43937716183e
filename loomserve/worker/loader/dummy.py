"""Random weights at the real shape of a named model, for benchmarks without checkpoints.

Parameters are allocated and filled on the target device itself (no host copy
of the model). Each checkpoint tensor (by Hugging Face name) is drawn whole
from its own generator, seeded from the seed and the name, and goes through the
same ``WeightFiller`` as real checkpoints: so a rank of a tensor-parallel group
keeps its slice of the very weights a single GPU would hold, and outputs can be
compared across group sizes. Linear and embedding weights are drawn with a
small standard deviation and norms are ones, so activations stay finite in
bf16 through every layer.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch

from loomserve.shared.dummy_shapes import DUMMY_SHAPES
from loomserve.worker.attention.base import AttentionBackend
from loomserve.worker.loader.build import build_model
from loomserve.worker.loader.safetensors_loader import read_hf_config
from loomserve.worker.loader.weights import WeightFiller
from loomserve.worker.model_config import ModelConfig
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import SINGLE, TensorParallel

log = logging.getLogger(__name__)

DUMMY_STD = 0.02

__all__ = ["DUMMY_SHAPES", "dummy_config", "fill_dummy_weights", "load_dummy"]


def dummy_config(model: str | Path) -> ModelConfig:
    """The config of a ``DUMMY_SHAPES`` name, or of a Hugging Face directory's config.json."""
    key = str(model).lower()
    if key in DUMMY_SHAPES:
        return ModelConfig.from_hf_config(DUMMY_SHAPES[key], name=key)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return read_hf_config(path)
    raise ValueError(
        f"no shape for dummy model {str(model)!r}: pass one of {', '.join(DUMMY_SHAPES)} or a "
        f"Hugging Face directory with a config.json"
    )


@torch.no_grad()
def fill_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Fill every parameter: norms 1, biases 0, others N(0, DUMMY_STD), each checkpoint
    tensor from a generator of its own (see the module's docstring)."""
    device = model.embed_tokens.weight.device
    if device.type == "meta":
        return
    filler = WeightFiller(model, f"dummy {model.config.name}")
    dtype = model.embed_tokens.weight.dtype
    for name, target in filler.targets.items():
        full = torch.empty(target.full_shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        elif name.endswith(".bias"):
            full.zero_()
        else:
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full.normal_(0.0, DUMMY_STD, generator=generator)
        filler.fill(name, full)
    filler.check_complete()


def load_dummy(
    model: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int,
    attn_backend: type[AttentionBackend],
    tp: TensorParallel = SINGLE,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = dummy_config(model)
    log.info(
        "dummy weights at the shape of %s (%d layers, hidden %d), seed %d",
        config.name,
        config.num_layers,
        config.hidden_size,
        seed,
    )
    net = build_model(config, attn_backend, dtype=dtype, device=device, tp=tp)
    fill_dummy_weights(net, seed)
    return net, config
