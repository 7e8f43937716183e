"""Llama-shaped decoder: Llama 2/3.x, Qwen2/2.5, Mistral and SmolLM2.

All of these are the same network: token embedding, N blocks of
(RMSNorm -> GQA attention with rotary embeddings -> residual,
RMSNorm -> SiLU-gated MLP -> residual), a final RMSNorm and an LM head.

The model works on a flattened batch (see ``worker.attention.base``): the new
tokens of every sequence on one axis of length T, with a paged KV cache per
layer. Projections are ``worker.parallel.Linear`` layers; under tensor parallelism
(``worker.parallel``) each rank builds the same network with its share of the
heads and features, the row-parallel projections, embedding and LM head being
the parallel layer classes of that module, so the forward passes do not change.

The elementwise stages (RMSNorm with its residual add, rotary embedding,
SiLU-and-multiply) are layer classes too, and the projections' product a
function; all are picked once at construction through ``LayerOps``: plain torch
on the CPU (``TORCH_OPS``), the fused Triton kernels of ``kernels/`` on a GPU
(``TRITON_OPS``, whose product sends one-row inputs, a batch-1 decode step, to
the matrix-vector kernel). The forward passes never branch on the device.

Parameter names are Hugging Face's without the ``model.`` prefix, except for
the fused modules; the loaders address weights by their Hugging Face names
through ``WeightFiller``, which fills row ranges of the fused modules and
keeps only this rank's slice (``Shard``) of each checkpoint tensor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loomserve.worker.attention.base import AttentionBackend, AttentionMetadata
from loomserve.worker.model_config import ModelConfig, llama3_freq_factors
from loomserve.worker.parallel import (
    SINGLE,
    Linear,
    Matmul,
    Shard,
    TensorParallel,
    embedding,
    lm_head,
    row_parallel_linear,
)

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
        from loomserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm

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


@dataclass(frozen=True)
class CacheWrite:
    """Where a rotary layer that can (``Rotary.writes_kv_cache``) puts the rotated keys and
    the values: this layer's cache, at the step's slots."""

    v: torch.Tensor  # (T, KV, D)
    kv_cache: torch.Tensor  # (2, num_blocks, block_size, KV, D)
    slot_mapping: torch.Tensor  # (T,)


class Rotary(nn.Module):
    """Rotary embedding of queries and keys in torch ops.

    Work that depends only on the positions is done once per forward pass by
    ``step_inputs`` (on the model's one instance); every attention layer then
    calls its own instance with the result.
    """

    # Whether ``forward`` also writes the keys and values into the KV cache when given a
    # ``CacheWrite`` (the attention backend is then told not to).
    writes_kv_cache = False

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

    def forward(
        self, qk: torch.Tensor, num_q_heads: int, step: tuple[torch.Tensor, ...], cache: CacheWrite | None = None
    ) -> torch.Tensor:
        """``qk`` (T, H + KV, D), the ``num_q_heads`` query heads followed by the key
        heads, rotated (a new tensor here; subclasses may rotate in place)."""
        if cache is not None:
            raise ValueError(f"{type(self).__name__} does not write the KV cache")
        cos, sin = step
        # Queries and keys get the same rotation, so one call covers both.
        return apply_rotary(qk, cos, sin)


class TritonRotary(Rotary):
    """:class:`Rotary` through ``kernels.rotary``: one in-place kernel per layer that
    reads each token's cos/sin row straight from the tables and, given a
    :class:`CacheWrite`, writes the rotated keys and the values into the KV cache in
    the same launch."""

    writes_kv_cache = True

    def __init__(self) -> None:
        super().__init__()
        # triton is optional: see TritonRMSNorm.
        from loomserve.kernels.rotary import apply_rotary as rotate_in_place

        self._rotate_in_place = rotate_in_place

    def step_inputs(
        self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return positions, cos_table, sin_table

    def forward(
        self, qk: torch.Tensor, num_q_heads: int, step: tuple[torch.Tensor, ...], cache: CacheWrite | None = None
    ) -> torch.Tensor:
        positions, cos_table, sin_table = step
        if cache is None:
            self._rotate_in_place(qk[:, :num_q_heads], qk[:, num_q_heads:], positions, cos_table, sin_table)
        else:
            self._rotate_in_place(
                qk[:, :num_q_heads],
                qk[:, num_q_heads:],
                positions,
                cos_table,
                sin_table,
                v=cache.v,
                kv_cache=cache.kv_cache,
                slot_mapping=cache.slot_mapping,
            )
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
        from loomserve.kernels.activation import silu_and_mul

        self._silu_and_mul = silu_and_mul

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(gate_up)


def torch_matmul() -> Matmul:
    return F.linear


def triton_matmul() -> Matmul:
    """``F.linear``, but one-row inputs go to ``kernels.gemv``."""
    # triton is optional: see TritonRMSNorm.
    from loomserve.kernels.gemv import linear

    return linear


@dataclass(frozen=True)
class LayerOps:
    """The implementations of the model's elementwise stages and of its projections'
    product (``matmul()`` returns it; called once per model)."""

    norm: type[RMSNorm]
    rotary: type[Rotary]
    activation: type[SiluAndMul]
    matmul: Callable[[], Matmul]


TORCH_OPS = LayerOps(norm=RMSNorm, rotary=Rotary, activation=SiluAndMul, matmul=torch_matmul)
TRITON_OPS = LayerOps(
    norm=TritonRMSNorm, rotary=TritonRotary, activation=TritonSiluAndMul, matmul=triton_matmul
)


def default_layer_ops(device: str | torch.device) -> LayerOps:
    """The fused Triton stages on a GPU, plain torch elsewhere."""
    return TRITON_OPS if torch.device(device).type == "cuda" else TORCH_OPS


class LlamaAttention(nn.Module):
    """Grouped-query attention over this rank's query heads and the KV heads they read."""

    def __init__(
        self,
        config: ModelConfig,
        attn_backend: type[AttentionBackend],
        ops: LayerOps,
        tp: TensorParallel,
        matmul: Matmul,
    ) -> None:
        super().__init__()
        self.num_heads = tp.split(config.num_heads, "num_heads")
        self.num_kv_heads, _ = tp.kv_heads(config.num_kv_heads, config.num_heads)
        self.head_dim = d = config.head_dim
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * d
        self.qkv_proj = Linear(config.hidden_size, qkv_size, config.attention_bias, matmul)
        self.o_proj = row_parallel_linear(
            config.q_size, config.hidden_size, config.attention_out_bias, tp, matmul
        )
        self.rotary = ops.rotary()
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, d, d**-0.5)

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
        v = qkv[:, h + kv :]
        # q and k are adjacent heads of qkv: one call rotates both, and where the rotary layer
        # can, writes k and v into the cache too (one kernel instead of two).
        fused = self.rotary.writes_kv_cache
        cache = CacheWrite(v, kv_cache, meta.slot_mapping) if fused else None
        qk = self.rotary(qkv[:, : h + kv], h, rope, cache)  # (T, H + KV, D)
        out = self.attn.forward(qk[:, :h], qk[:, h:], v, kv_cache, meta, kv_written=fused)  # (T, H, D)
        return self.o_proj(out.reshape(t, h * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: LayerOps, tp: TensorParallel, matmul: Matmul) -> None:
        super().__init__()
        local = tp.split(config.intermediate_size, "intermediate_size")
        self.gate_up_proj = Linear(config.hidden_size, 2 * local, False, matmul)
        self.act = ops.activation()
        self.down_proj = row_parallel_linear(config.intermediate_size, config.hidden_size, False, tp, matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        return self.down_proj(self.act(self.gate_up_proj(x)))  # via (T, 2 I) and (T, I)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        attn_backend: type[AttentionBackend],
        ops: LayerOps,
        tp: TensorParallel,
        matmul: Matmul,
    ) -> None:
        super().__init__()
        self.input_layernorm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, attn_backend, ops, tp, matmul)
        self.post_attention_layernorm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, ops, tp, matmul)

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
        matmul = ops.matmul()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn_backend, ops, tp, matmul) for _ in range(config.num_layers)
        )
        self.norm = ops.norm(config.hidden_size, config.rms_norm_eps)
        self.rotary = ops.rotary()
        self.lm_head = lm_head(config.hidden_size, config.vocab_size, tp, matmul)
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

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads of this rank's KV cache."""
        layer: LlamaDecoderLayer = self.layers[0]  # type: ignore[assignment]
        return layer.self_attn.num_kv_heads

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32 logits (on every rank of a group)."""
        return self.lm_head(hidden).float()

    # -- weights by Hugging Face name -------------------------------------------------

    def hf_weight_targets(self) -> dict[str, WeightTarget]:
        """Map each Hugging Face weight name to what it fills on this rank.

        Our names are the Hugging Face ones without ``model.``, except that q/k/v
        land in row ranges of ``qkv_proj`` and gate/up in ``gate_up_proj``. A tied
        model has no ``lm_head.weight`` entry.
        """
        c, tp = self.config, self.tp
        d = c.head_dim
        num_heads = tp.split(c.num_heads, "num_heads")
        num_kv, first_kv = tp.kv_heads(c.num_kv_heads, c.num_heads)
        inter = tp.split(c.intermediate_size, "intermediate_size")
        _, vocab = tp.vocab_shard(c.vocab_size)
        # Per checkpoint module: (rows it fills here, its full shape's first dim, its shard or None).
        q = (Shard(0, tp.rank * num_heads * d, num_heads * d), c.q_size)
        kv = (Shard(0, first_kv * d, num_kv * d), c.kv_size)
        mlp = (Shard(0, tp.rank * inter, inter), c.intermediate_size)
        fused: dict[str, tuple[tuple[str, tuple[Shard, int]], ...]] = {
            "qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
            "gate_up_proj": (("gate_proj", mlp), ("up_proj", mlp)),
        }
        # Row-parallel weights keep a slice of their input features; their bias is whole.
        row_parallel = {"o_proj": c.q_size, "down_proj": c.intermediate_size}
        single = tp.size == 1
        targets: dict[str, WeightTarget] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            prefix = "" if name.startswith("lm_head.") else "model."
            module, kind = name.rsplit(".", 1)  # e.g. "layers.0.self_attn.qkv_proj", "weight"
            parent, _, leaf = module.rpartition(".")
            if leaf in fused:
                offset = 0
                for part, (part_shard, full_rows) in fused[leaf]:
                    full = (full_rows, *param.shape[1:])
                    targets[f"{prefix}{parent}.{part}.{kind}"] = WeightTarget(
                        param, offset, part_shard.length, full, None if single else part_shard
                    )
                    offset += part_shard.length
                continue
            full_shape = tuple(param.shape)
            shard: Shard | None = None
            rows = param.shape[0]
            if leaf in row_parallel and kind == "weight":
                full_shape = (param.shape[0], row_parallel[leaf])
                shard = tp.even_shard(row_parallel[leaf], leaf, dim=1)
            elif leaf in ("embed_tokens", "lm_head"):
                full_shape = (c.vocab_size, param.shape[1])
                shard, rows = vocab, vocab.length
            targets[prefix + name] = WeightTarget(param, 0, rows, full_shape, None if single else shard)
        return targets


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: ``rows`` rows of ``param`` from ``offset``,
    after keeping this rank's ``shard`` of it (None: all of it)."""

    param: torch.Tensor
    offset: int
    rows: int
    full_shape: tuple[int, ...]  # the checkpoint tensor's shape
    shard: Shard | None


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
    every parameter in place. ``ops`` defaults to the device's
    (``default_layer_ops``).
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
        model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
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

    def _target(self, hf_name: str) -> WeightTarget | None:
        target = self.targets.get(hf_name)
        if target is None and not (
            hf_name.endswith(_IGNORED_WEIGHT_SUFFIXES) or (self.tied and hf_name == "lm_head.weight")
        ):
            raise ValueError(f"{self.source}: unexpected weight {hf_name!r} for this model architecture")
        return target

    def shard(self, hf_name: str) -> Shard | None:
        """The slice of this checkpoint tensor this rank keeps (None: all of it); a loader
        that can read a slice alone passes it to ``fill`` with ``sliced=True``."""
        target = self._target(hf_name)
        return None if target is None else target.shard

    @torch.no_grad()
    def fill(self, hf_name: str, tensor: torch.Tensor, *, sliced: bool = False) -> None:
        """Copy a checkpoint tensor (or, with ``sliced``, already this rank's shard of it) in."""
        target = self._target(hf_name)
        if target is None:
            return
        if target.shard is not None and not sliced:
            if tuple(tensor.shape) != target.full_shape:
                raise ValueError(
                    f"{self.source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {target.full_shape}"
                )
            tensor = target.shard.take(tensor)
        param = target.param
        expected = (target.rows, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{self.source}: weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        # Move first, so a dtype cast runs on the (GPU) target rather than the host.
        param.narrow(0, target.offset, target.rows).copy_(tensor.to(param.device))
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
