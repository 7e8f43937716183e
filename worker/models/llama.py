"""Llama-shaped decoder: Llama 2/3.x, Qwen2/2.5, Mistral and SmolLM2.

All of these are the same network: token embedding, N blocks of
(RMSNorm -> GQA attention with rotary embeddings -> residual,
RMSNorm -> SiLU-gated MLP -> residual), a final RMSNorm and an LM head.

The model works on a flattened batch (see ``worker.attention.base``): the new
tokens of every sequence on one axis of length T, with a paged KV cache per
layer. Projections are plain ``nn.Linear`` so tensor parallelism and
quantisation can later swap the layer classes; the fused ``qkv_proj`` and
``gate_up_proj`` record their part sizes (``qkv_sizes``, ``gate_up_sizes``) for
that.

The elementwise stages (RMSNorm with its residual add, rotary embedding,
SiLU-and-multiply) are layer classes too, picked once at construction through
``LayerOps``: plain torch on the CPU (``TORCH_OPS``), the fused Triton kernels of
``kernels/`` on a GPU (``TRITON_OPS``). The forward passes never branch on the
device.

Parameter names are Hugging Face's without the ``model.`` prefix, except for
the fused modules; the loaders address weights by their Hugging Face names
through ``WeightFiller``, which fills row ranges of the fused modules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.attention.base import AttentionBackend, AttentionMetadata
from worker.model_config import ModelConfig, llama3_freq_factors

log = logging.getLogger(__name__)

# Checkpoint entries that are derived state, not weights.
_IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)
_PROGRESS_SECONDS = 5.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(norm(x + residual), x + residual)``; the sum is the next residual."""
        if residual is not None:
            x = x + residual  # (T, hidden)
        # One fused op (the six-op formula costs ~20 us a call on the CPU); it
        # normalises in fp32 and is bit-identical to the reference models in fp32.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x


class TritonRMSNorm(RMSNorm):
    """:class:`RMSNorm` through ``kernels.rmsnorm``: the residual add and the norm in
    one pass over the activations instead of three kernels."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        # Imported here, not at the top: triton is an optional dependency that only
        # models built for a GPU need.
        from kernels.rmsnorm import fused_add_rms_norm, rms_norm

        self._rms_norm = rms_norm
        self._fused_add_rms_norm = fused_add_rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps), x
        return self._fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (head_dim / 2,) in fp32, Llama 3 scaling applied if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_scaling is not None:
        divisors = llama3_freq_factors(config.rope_scaling, d, config.rope_theta)
        inv_freq = inv_freq / torch.tensor(divisors, dtype=torch.float32)
    return inv_freq


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (T, N, D) in the Hugging Face "rotate_half" layout.

    ``cos`` is (T, 1, D) and ``sin`` (T, 1, D) already signed as ``[-sin, sin]``,
    so ``x * cos + [x2, x1] * sin`` equals ``x * cos + rotate_half(x) * sin``.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # (T, N, D)
    return torch.addcmul(x * cos, swapped, sin)


class Rotary(nn.Module):
    """Rotary embedding of queries and keys in torch ops.

    Work that depends only on the positions is done once per forward pass by
    ``step_inputs`` (on the model's one instance); every attention layer then
    calls its own instance with the result.
    """

    def step_inputs(
        self,
        cos_table: torch.Tensor,  # (max_positions, D / 2)
        sin_table: torch.Tensor,  # (max_positions, D / 2)
        positions: torch.Tensor,  # (T,) int64
    ) -> tuple[torch.Tensor, ...]:
        """``(cos, signed sin)``, each (T, 1, D): the rotation gathered once per step
        rather than once per layer."""
        cos = cos_table[positions]  # (T, D / 2)
        sin = sin_table[positions]
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)

    def forward(self, qk: torch.Tensor, num_q_heads: int, step: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``qk`` (T, H + KV, D), the ``num_q_heads`` query heads followed by the key
        heads, rotated (a new tensor here; subclasses may rotate in place)."""
        cos, sin = step
        # Queries and keys get the same rotation, so one call covers both.
        return apply_rotary(qk, cos, sin)


class TritonRotary(Rotary):
    """:class:`Rotary` through ``kernels.rotary``: one in-place kernel per layer that
    reads each token's cos/sin row straight from the tables."""

    def __init__(self) -> None:
        super().__init__()
        # triton is optional: see TritonRMSNorm.
        from kernels.rotary import apply_rotary as rotate_in_place

        self._rotate_in_place = rotate_in_place

    def step_inputs(
        self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return positions, cos_table, sin_table

    def forward(self, qk: torch.Tensor, num_q_heads: int, step: tuple[torch.Tensor, ...]) -> torch.Tensor:
        positions, cos_table, sin_table = step
        self._rotate_in_place(qk[:, :num_q_heads], qk[:, num_q_heads:], positions, cos_table, sin_table)
        return qk


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` of a fused (T, 2 I) gate/up projection, in torch ops."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # (T, 2 I) -> (T, I)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonSiluAndMul(SiluAndMul):
    """:class:`SiluAndMul` through ``kernels.activation``: one kernel instead of two and
    no (T, I) intermediate."""

    def __init__(self) -> None:
        super().__init__()
        # triton is optional: see TritonRMSNorm.
        from kernels.activation import silu_and_mul

        self._silu_and_mul = silu_and_mul

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(gate_up)


@dataclass(frozen=True)
class LayerOps:
    """The implementations of the model's elementwise stages."""

    norm: type[RMSNorm]
    rotary: type[Rotary]
    activation: type[SiluAndMul]


TORCH_OPS = LayerOps(norm=RMSNorm, rotary=Rotary, activation=SiluAndMul)
TRITON_OPS = LayerOps(norm=TritonRMSNorm, rotary=TritonRotary, activation=TritonSiluAndMul)


def default_layer_ops(device: str | torch.device) -> LayerOps:
    """The fused Triton stages on a GPU, plain torch elsewhere."""
    return TRITON_OPS if torch.device(device).type == "cuda" else TORCH_OPS


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], ops: LayerOps) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv_sizes = (config.q_size, config.kv_size, config.kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.attention_out_bias)
        self.rotary = ops.rotary()
        self.attn = attn_backend(config.num_heads, config.num_kv_heads, config.head_dim, config.head_dim**-0.5)

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
        qk = self.rotary(qkv[:, : h + kv], h, rope)  # (T, H + KV, D): q and k are adjacent heads of qkv
        out = self.attn.forward(qk[:, :h], qk[:, h:], qkv[:, h + kv :], kv_cache, meta)  # (T, H, D)
        return self.o_proj(out.reshape(t, h * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: LayerOps) -> None:
        super().__init__()
        self.gate_up_sizes = (config.intermediate_size, config.intermediate_size)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.act = ops.activation()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        return self.down_proj(self.act(self.gate_up_proj(x)))  # via (T, 2 I) and (T, I)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], ops: LayerOps) -> None:
        super().__init__()
        self.input_layernorm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, attn_backend, ops)
        self.post_attention_layernorm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, ops)

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
        self, config: ModelConfig, attn_backend: type[AttentionBackend], ops: LayerOps = TORCH_OPS
    ) -> None:
        super().__init__()
        self.config = config
        self.ops = ops
        # An explicit weight skips nn.Embedding's random init, which on the meta
        # device (see build_model) costs seconds of one-off setup in torch.
        self.embed_tokens = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attn_backend, ops) for _ in range(config.num_layers))
        self.norm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.rotary = ops.rotary()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
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
        inv_freq = rope_inv_freq(self.config).to(device)  # (D / 2,)
        positions = torch.arange(self.config.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (P, D / 2)
        # Computed in fp32 and rounded to the model dtype, as the reference models do.
        self.rope_cos = freqs.cos().to(dtype)
        self.rope_sin = freqs.sin().to(dtype)

    def tie_weights(self) -> None:
        """Share the LM head with the embedding again (``to_empty`` unties them)."""
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits."""
        return self.lm_head(hidden).float()

    # -- weights by Hugging Face name -------------------------------------------------

    def hf_weight_targets(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Map each Hugging Face weight name to the (parameter, row offset, rows) it fills.

        Our names are the Hugging Face ones without ``model.``, except that q/k/v
        land in row ranges of ``qkv_proj`` and gate/up in ``gate_up_proj``. A tied
        model has no ``lm_head.weight`` entry.
        """
        c = self.config
        params = dict(self.named_parameters(remove_duplicate=False))
        fused = {
            "qkv_proj": (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)),
            "gate_up_proj": (("gate_proj", c.intermediate_size), ("up_proj", c.intermediate_size)),
        }
        targets: dict[str, tuple[torch.Tensor, int, int]] = {}
        for name, param in params.items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            prefix = "" if name.startswith("lm_head.") else "model."
            module, kind = name.rsplit(".", 1)  # e.g. "layers.0.self_attn.qkv_proj", "weight"
            parent, _, leaf = module.rpartition(".")
            if leaf not in fused:
                targets[prefix + name] = (param, 0, param.shape[0])
                continue
            offset = 0
            for part, rows in fused[leaf]:
                targets[f"{prefix}{parent}.{part}.{kind}"] = (param, offset, rows)
                offset += rows
        return targets


def build_model(
    config: ModelConfig,
    attn_backend: type[AttentionBackend],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    ops: LayerOps | None = None,
) -> LlamaForCausalLM:
    """The model with uninitialised parameters allocated directly on ``device``.

    Built on the meta device first, so no time goes into random initialisation
    and no full-size copy crosses from host to device; the loaders then fill
    every parameter in place. ``ops`` defaults to the device's
    (``default_layer_ops``).
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config, attn_backend, ops or default_layer_ops(device))
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_rope_cache()
    model.requires_grad_(False)
    return model.eval()


class WeightFiller:
    """Copies checkpoint tensors, by Hugging Face name, into a model's (fused) parameters.

    Tracks what has been filled so a checkpoint with a missing weight fails
    loudly instead of serving uninitialised memory, and logs progress.
    """

    def __init__(self, model: LlamaForCausalLM, source: str) -> None:
        self.targets = model.hf_weight_targets()
        self.tied = model.config.tie_word_embeddings
        self.source = source
        self.filled: set[str] = set()
        self._started = self._last_log = time.monotonic()
        self._next_quarter = 1

    @torch.no_grad()
    def fill(self, hf_name: str, tensor: torch.Tensor) -> None:
        target = self.targets.get(hf_name)
        if target is None:
            if hf_name.endswith(_IGNORED_WEIGHT_SUFFIXES) or (self.tied and hf_name == "lm_head.weight"):
                return
            raise ValueError(f"{self.source}: unexpected weight {hf_name!r} for this model architecture")
        param, offset, rows = target
        expected = (rows, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{self.source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        # Move first, so a dtype cast runs on the (GPU) target rather than the host.
        param.narrow(0, offset, rows).copy_(tensor.to(param.device))
        self.filled.add(hf_name)
        self._log_progress()

    def _log_progress(self) -> None:
        now = time.monotonic()
        done, total = len(self.filled), len(self.targets)
        quarter_reached = done * 4 >= self._next_quarter * total
        if quarter_reached or now - self._last_log >= _PROGRESS_SECONDS:
            log.info(
                "loading %s: %d/%d weights (%.0f%%), %.1f s",
                self.source,
                done,
                total,
                100.0 * done / total,
                now - self._started,
            )
            self._last_log = now
            while done * 4 >= self._next_quarter * total:
                self._next_quarter += 1

    def check_complete(self) -> None:
        missing = sorted(set(self.targets) - self.filled)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{self.source}: checkpoint lacks {len(missing)} weights: {shown}")


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (keys and values)."""
    per_layer = 2 * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize
    return per_layer * config.num_layers


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> list[torch.Tensor]:
    """One zeroed (2, num_blocks, block_size, KV, D) cache per layer.

    Zeroed rather than empty: attention multiplies masked-out slots by a zero
    weight, and a NaN left in fresh memory would still poison the result.
    """
    shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
