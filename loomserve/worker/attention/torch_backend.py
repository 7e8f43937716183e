"""Paged attention in plain PyTorch: the CPU production path and the reference for kernels/.

Each call writes the new keys and values into the cache, then attends every
new token over its sequence's cached context, read back through the block
table. Sequences are split in two groups:

* decodes (one new token): all handled by one batched
  ``scaled_dot_product_attention`` call over the gathered blocks, masked by
  ``seq_lens``. GQA costs no copy: the G query heads sharing a KV head are laid
  out as G query rows of that KV head, which is valid because a decode token
  sees every cached position.
* prefills and extends (several new tokens): one call per sequence, causal
  with the offset of its cached prefix.

The index tensors and masks depend only on the batch, not on the layer, so
they are built once per batch (``_BatchPlan``) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loomserve.kernels import KV_FP8, to_cache_dtype
from loomserve.worker.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class _Extend:
    """One sequence with several new tokens."""

    rows: slice  # its rows of the flattened batch
    blocks: torch.Tensor  # (num_blocks,) int64, the blocks holding its context
    seq_len: int
    mask: torch.Tensor | None  # (n, seq_len) additive (0 / -inf); None: plain causal, no prefix


@dataclass
class _BatchPlan:
    meta: AttentionMetadata
    block_size: int
    dtype: torch.dtype  # of the additive masks, which must match the queries'
    seq_lens: list[int]  # copies of the host lists the plan was built from
    query_start_loc: list[int]
    write_rows: torch.Tensor | None  # (W,) rows to write; None: every row
    write_slots: torch.Tensor  # (W,) or (T,) int64 slots
    decode_rows: torch.Tensor | None  # (Bd,) rows of decode tokens; None: rows 0..Bd-1
    decode_blocks: torch.Tensor | None  # (Bd * nb,) int64 block ids, sequence-major
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, nb * block_size) additive, 0 / -inf
    extends: list[_Extend]
    num_rows: int  # rows that belong to a sequence; rows after it are padding


def _gather(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``blocks`` of one half of a cache, in ``dtype``: a cache held as bytes is FP8."""
    gathered = cache.index_select(0, blocks)
    return gathered.view(torch.float8_e4m3fn).to(dtype) if cache.dtype == torch.uint8 else gathered


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, -inf elsewhere; SDPA would otherwise convert a bool mask every call."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _plan(meta: AttentionMetadata, block_size: int, num_tokens: int, dtype: torch.dtype) -> _BatchPlan:
    """Index tensors and masks of one batch. On a GPU this syncs with the host once
    (to find padding slots), per batch rather than per layer."""
    device = meta.slot_mapping.device
    slots = meta.slot_mapping
    valid = slots >= 0  # (T,)
    if bool(valid.all()):
        write_rows, write_slots = None, slots
    else:
        write_rows = valid.nonzero().squeeze(1)
        write_slots = slots[write_rows]

    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    decode_seqs: list[int] = []
    extends: list[_Extend] = []
    for i, seq_len in enumerate(seq_lens):
        n = starts[i + 1] - starts[i]
        if n == 0:
            continue
        if n == 1:
            decode_seqs.append(i)
            continue
        nb = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :nb].long()
        prefix = seq_len - n
        mask = None
        if prefix > 0:
            # New token j is at position prefix + j and sees positions <= prefix + j.
            allowed = torch.ones(n, seq_len, dtype=torch.bool, device=device).tril(prefix)
            mask = _additive(allowed, dtype)
        extends.append(_Extend(slice(starts[i], starts[i + 1]), blocks, seq_len, mask))

    decode_rows = decode_blocks = decode_mask = None
    if decode_seqs:
        nb = -(-max(seq_lens[i] for i in decode_seqs) // block_size)
        all_decode = len(decode_seqs) == len(seq_lens)
        if all_decode:
            tables, lens = meta.block_tables[:, :nb], meta.seq_lens
        else:
            index = torch.tensor(decode_seqs, dtype=torch.int64, device=device)
            tables, lens = meta.block_tables[index, :nb], meta.seq_lens[index]
            decode_rows = torch.tensor([starts[i] for i in decode_seqs], dtype=torch.int64, device=device)
        decode_blocks = tables.reshape(-1).long()
        positions = torch.arange(nb * block_size, device=device)  # (L,)
        allowed = (positions < lens.unsqueeze(1)).view(len(decode_seqs), 1, 1, -1)
        decode_mask = _additive(allowed, dtype)
        if all_decode and num_tokens != len(decode_seqs):
            # Padding rows follow the decodes: take the decode path through the
            # general route so the padding rows get zeros.
            decode_rows = torch.arange(len(decode_seqs), device=device)
    return _BatchPlan(
        meta=meta,
        block_size=block_size,
        dtype=dtype,
        seq_lens=list(seq_lens),
        query_start_loc=list(starts),
        write_rows=write_rows,
        write_slots=write_slots,
        decode_rows=decode_rows,
        decode_blocks=decode_blocks,
        decode_mask=decode_mask,
        extends=extends,
        num_rows=starts[-1],
    )


class TorchAttentionBackend(AttentionBackend):
    """Paged attention with ``torch.nn.functional.scaled_dot_product_attention``.

    The per-batch plan is keyed by the identity of the ``AttentionMetadata``
    object (and its host lists), so build a new metadata object for every step
    rather than changing one in place.
    """

    # Shared by all layers' instances: the plan of the batch being run, rebuilt
    # when another AttentionMetadata object comes in.
    _plan_cache: _BatchPlan | None = None

    def _get_plan(self, meta: AttentionMetadata, block_size: int, num_tokens: int, dtype: torch.dtype) -> _BatchPlan:
        cached = TorchAttentionBackend._plan_cache
        if (
            cached is not None
            and cached.meta is meta
            and cached.block_size == block_size
            and cached.dtype == dtype
            and cached.seq_lens == meta.seq_lens_cpu
            and cached.query_start_loc == meta.query_start_loc_cpu
        ):
            return cached
        plan = _plan(meta, block_size, num_tokens, dtype)
        TorchAttentionBackend._plan_cache = plan
        return plan

    def forward(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, KV, D)
        v: torch.Tensor,  # (T, KV, D)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, KV, D)
        meta: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:  # (T, H, D)
        _, num_blocks, block_size, kvh, d = kv_cache.shape
        t = q.shape[0]
        plan = self._get_plan(meta, block_size, t, q.dtype)
        if kv_cache.dtype == KV_FP8:
            # Written and gathered as bytes (torch has no FP8 indexing on the CPU), read back
            # in the queries' dtype (``_gather``); stored as the kernels store them.
            kv_cache = kv_cache.view(torch.uint8)
            k, v = to_cache_dtype(k, KV_FP8), to_cache_dtype(v, KV_FP8)
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # (num_blocks, block_size, KV, D)

        flat_k = key_cache.view(num_blocks * block_size, kvh, d)
        flat_v = value_cache.view(num_blocks * block_size, kvh, d)
        if not kv_written:
            if plan.write_rows is not None:
                k, v = k[plan.write_rows], v[plan.write_rows]
            flat_k.index_copy_(0, plan.write_slots, k)
            flat_v.index_copy_(0, plan.write_slots, v)

        if plan.decode_blocks is not None and plan.decode_rows is None:  # pure decode batch
            return self._decode(q, key_cache, value_cache, plan)
        if plan.decode_blocks is None and len(plan.extends) == 1 and plan.num_rows == t:
            return self._extend(q, key_cache, value_cache, plan.extends[0])  # one prefill
        # Padding rows (after the last sequence) are left zero.
        alloc = q.new_zeros if plan.num_rows < t else q.new_empty
        out = alloc(t, self.num_heads, d)
        if plan.decode_blocks is not None:
            assert plan.decode_rows is not None
            out[plan.decode_rows] = self._decode(q[plan.decode_rows], key_cache, value_cache, plan)
        for ext in plan.extends:
            out[ext.rows] = self._extend(q[ext.rows], key_cache, value_cache, ext)
        return out

    def _decode(
        self,
        q: torch.Tensor,  # (Bd, H, D), one token per sequence
        key_cache: torch.Tensor,  # (num_blocks, block_size, KV, D)
        value_cache: torch.Tensor,
        plan: _BatchPlan,
    ) -> torch.Tensor:  # (Bd, H, D)
        assert plan.decode_blocks is not None
        b = q.shape[0]
        kvh, d = self.num_kv_heads, self.head_dim
        group = self.num_heads // kvh
        # Query head h reads KV head h // group, so (H,) splits as (KV, group).
        qg = q.reshape(b, kvh, group, d)  # (Bd, KV, G, D)
        keys = _gather(key_cache, plan.decode_blocks, q.dtype).view(b, -1, kvh, d)  # (Bd, L, KV, D)
        values = _gather(value_cache, plan.decode_blocks, q.dtype).view(b, -1, kvh, d)
        out = F.scaled_dot_product_attention(
            qg,
            keys.transpose(1, 2),  # (Bd, KV, L, D)
            values.transpose(1, 2),
            attn_mask=plan.decode_mask,  # (Bd, 1, 1, L)
            scale=self.scale,
        )  # (Bd, KV, G, D)
        return out.reshape(b, self.num_heads, d)

    def _extend(
        self,
        q: torch.Tensor,  # (n, H, D)
        key_cache: torch.Tensor,  # (num_blocks, block_size, KV, D)
        value_cache: torch.Tensor,
        ext: _Extend,
    ) -> torch.Tensor:  # (n, H, D)
        kvh, d = self.num_kv_heads, self.head_dim
        keys = _gather(key_cache, ext.blocks, q.dtype).view(-1, kvh, d)[: ext.seq_len]  # (S, KV, D)
        values = _gather(value_cache, ext.blocks, q.dtype).view(-1, kvh, d)[: ext.seq_len]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # (H, n, D)
            keys.transpose(0, 1),  # (KV, S, D)
            values.transpose(0, 1),
            attn_mask=ext.mask,
            is_causal=ext.mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != kvh,
        )  # (H, n, D)
        return out.transpose(0, 1)
