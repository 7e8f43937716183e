"""Load a llama.cpp GGUF file: config from its metadata, weights dequantised to ``dtype``.

Every tensor is read from the memory-mapped file, dequantised on the host with
``gguf.quants.dequantize`` and copied into its parameter, one at a time, so
peak host memory is about one fp32 tensor above the model itself.

Two layout differences from Hugging Face checkpoints are undone here:

* GGUF lists dimensions fastest-first, so a torch (out, in) weight has GGUF
  shape [in, out];
* for the ``llama`` architecture, llama.cpp permutes the rows of attn_q and
  attn_k (weights and biases) within each head so that its interleaved rotary
  embedding works on them; our model rotates the two halves of each head
  ("rotate_half"), so the rows are permuted back. ``qwen2`` files are stored
  unpermuted because llama.cpp already uses the half layout for that family.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from loomserve.worker.attention.base import AttentionBackend
from loomserve.worker.loader.build import build_model
from loomserve.worker.loader.weights import WeightFiller
from loomserve.worker.model_config import ModelConfig
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import SINGLE, TensorParallel

log = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a llama/qwen2 model")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


@functools.cache
def supported_quant_types() -> frozenset[GGMLQuantizationType]:
    """The tensor types ``gguf.quants.dequantize`` can turn into floats (probed once)."""
    supported = set()
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        # One zero block per row: F32/F16 rows come as their own dtype, the rest as bytes.
        dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        probe = np.zeros(
            (1, type_size // np.dtype(dtype.get(qtype, np.uint8)).itemsize), dtype=dtype.get(qtype, np.uint8)
        )
        try:
            out = dequantize(probe, qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        if out.shape[-1] == block_size and np.issubdtype(out.dtype, np.floating):
            supported.add(qtype)
    return frozenset(supported)


def tensor_to_torch(tensor: ReaderTensor) -> torch.Tensor:
    """Dequantise one GGUF tensor to an fp32 torch tensor in torch's dimension order."""
    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype not in supported_quant_types():
        names = ", ".join(sorted(t.name for t in supported_quant_types()))
        raise ValueError(f"GGUF tensor {tensor.name!r} has unsupported type {qtype.name}; supported: {names}")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    # As a plain ndarray: slicing the memmap subclass row group by row group
    # costs more than the dequantisation itself.
    values = dequantize(np.asarray(tensor.data), qtype).reshape(shape)
    # A copy: F32 tensors come back as views of the read-only memory map.
    return torch.from_numpy(np.array(values, dtype=np.float32))


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, [pairs (0, 1), (2, 3), ...] -> [evens..., odds...]."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    # llama.cpp stored head row 2i as HF row i and row 2i + 1 as HF row half + i.
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """GGUF key/values as Python values, leaving out the big tokenizer arrays."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and not key.endswith("_token_id"):
            continue
        metadata[key] = field.contents()
    return metadata


def load_gguf(
    path: Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    attn_backend: type[AttentionBackend],
    tp: TensorParallel = SINGLE,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load a GGUF file of a llama or qwen2 architecture model (this rank's part of it:
    each tensor is dequantised whole, then sliced)."""
    reader = GGUFReader(path)
    metadata = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight")
    rope_freqs = tensors.get(_ROPE_FREQS)
    config = ModelConfig.from_gguf_metadata(
        metadata,
        has_output_weight="output.weight" in tensors,
        rope_freq_factors=None if rope_freqs is None else tensor_to_torch(rope_freqs).tolist(),
        vocab_size=int(embedding.shape[1]),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        out_bias="blk.0.attn_output.bias" in tensors,
    )
    log.info(
        "GGUF %s: %s, %d layers, hidden %d, %d tensors",
        path.name,
        config.name,
        config.num_layers,
        config.hidden_size,
        len(tensors),
    )
    model = build_model(config, attn_backend, dtype=dtype, device=device, tp=tp)
    filler = WeightFiller(model, path.name)
    permuted = config.architecture == "llama"
    for name, tensor in tensors.items():
        if name == _ROPE_FREQS:
            continue
        target = hf_name(name)
        weight = tensor_to_torch(tensor)
        if permuted and ".attn_q." in name:
            weight = unpermute_rope_rows(weight, config.num_heads)
        elif permuted and ".attn_k." in name:
            weight = unpermute_rope_rows(weight, config.num_kv_heads)
        filler.fill(target, weight)
    filler.check_complete()
    return model, config
