"""Llama-shaped decoder: Llama 2/3.x, Qwen2/2.5, Mistral and SmolLM2.

All of these are the same network: token embedding, N blocks of
(RMSNorm -> GQA attention with rotary embeddings -> residual,
RMSNorm -> SiLU-gated MLP -> residual), a final RMSNorm and an LM head.

The model works on a flattened batch (see ``worker.attention.base``): the new
tokens of every sequence on one axis of length T, with a paged KV cache per
layer. It is built from the layer classes of ``worker.layers``, chosen by the
caller: ``LayerOps`` (torch or Triton variants, and the linear method of the
projections) and a ``TensorParallel`` group, under which each rank builds the
same network with its share of the heads and features. The forward passes do
not change with either.

Parameter names are Hugging Face's without the ``model.`` prefix, except for
the fused ``qkv_proj`` and ``gate_up_proj``; the loaders map checkpoint names
onto them (``worker.loader.weights``).
"""

from __future__ import annotations

import torch
from torch import nn

from loomserve.worker.attention.base import AttentionBackend, AttentionMetadata
from loomserve.worker.layers.attention import Attention
from loomserve.worker.layers.embedding import embedding, lm_head
from loomserve.worker.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    even_parts,
    qkv_parts,
    row_parallel_linear,
)
from loomserve.worker.layers.ops import TORCH_OPS, LayerOps
from loomserve.worker.layers.rotary import rope_tables
from loomserve.worker.model_config import ModelConfig
from loomserve.worker.parallel import SINGLE, TensorParallel


class LlamaAttention(nn.Module):
    """Grouped-query attention over this rank's query heads and the KV heads they read."""

    def __init__(
        self,
        config: ModelConfig,
        attn_backend: type[AttentionBackend],
        ops: LayerOps,
        tp: TensorParallel,
        linear: LinearMethod,
    ) -> None:
        super().__init__()
        self.num_heads = tp.split(config.num_heads, "num_heads")
        self.num_kv_heads, _ = tp.kv_heads(config.num_kv_heads, config.num_heads)
        self.head_dim = d = config.head_dim
        qkv = qkv_parts(config.num_heads, config.num_kv_heads, d, tp)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, qkv, config.attention_bias, linear)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d**-0.5, attn_backend, ops.rotary())
        self.o_proj = row_parallel_linear(config.q_size, config.hidden_size, config.attention_out_bias, tp, linear)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        rope: tuple[torch.Tensor, ...],  # this step's Rotary.step_inputs
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KV, D)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        h, kv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, h + 2 * kv, self.head_dim)  # (T, H + 2 KV, D)
        out = self.attn(qkv, rope, kv_cache, meta)  # (T, H, D)
        return self.o_proj(out.reshape(t, h * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: LayerOps, tp: TensorParallel, linear: LinearMethod) -> None:
        super().__init__()
        inter = config.intermediate_size
        gate_up = even_parts((inter, inter), tp, "intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, gate_up, False, linear)
        self.act = ops.activation()
        self.down_proj = row_parallel_linear(inter, config.hidden_size, False, tp, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        return self.down_proj(self.act(self.gate_up_proj(x)))  # via (T, 2 I) and (T, I)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attn_backend: type[AttentionBackend],
        ops: LayerOps,
        tp: TensorParallel,
        linear: LinearMethod,
    ) -> None:
        super().__init__()
        self.input_layernorm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, attn_backend, ops, tp, linear)
        self.post_attention_layernorm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, ops, tp, linear)

    def forward(
        self,
        hidden: torch.Tensor,  # (T, hidden)
        residual: torch.Tensor | None,  # (T, hidden); None before the first layer
        rope: tuple[torch.Tensor, ...],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the block's output and the residual stream, not yet added together;
        the next layer's norm adds them, saving one pass over the activations."""
        x, residual = self.input_layernorm(hidden, residual)
        x = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attn_backend: type[AttentionBackend],
        ops: LayerOps = TORCH_OPS,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        linear = ops.linear()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn_backend, ops, tp, linear) for _ in range(config.num_layers)
        )
        self.norm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.rotary = ops.rotary()
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp, linear)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.init_rope_cache()

    def init_rope_cache(self) -> None:
        """(Re)build the cos/sin tables, (max_positions, D / 2), on the model's device and dtype.

        The loaders build the model on the meta device and then allocate it, which
        leaves buffers uninitialised; they call this afterwards.
        """
        device, dtype = self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        if device.type == "meta":
            self.rope_cos = torch.empty(0, device=device, dtype=dtype)
            self.rope_sin = torch.empty(0, device=device, dtype=dtype)
            return
        self.rope_cos, self.rope_sin = rope_tables(self.config, device, dtype)

    def tie_weights(self) -> None:
        """Share the LM head with the embedding (again: ``to_empty`` unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[torch.Tensor],  # per layer (2, num_blocks, block_size, KV, D)
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states (T, hidden) of the new tokens; feed the rows to
        sample to ``compute_logits``."""
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        rope = self.rotary.step_inputs(self.rope_cos, self.rope_sin, positions)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads of this rank's KV cache."""
        layer: LlamaDecoderLayer = self.layers[0]  # type: ignore[assignment]
        return layer.self_attn.num_kv_heads

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits (on every rank of a group)."""
        return self.lm_head(hidden).float()
