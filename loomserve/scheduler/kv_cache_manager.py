"""Per-request block tables over the block pool, with automatic prefix caching.

A request's KV lives in a table of block ids; slot ``t`` of the request is slot
``t % block_size`` of block ``table[t // block_size]``. A block whose
``block_size`` tokens are all known is identified by a hash chain, so a later
request whose tokens begin the same way reuses it instead of recomputing::

    root   = H("root", cache_salt)                  one root per tenant
    hash_0 = H(root,     tokens[0:B],   extra_keys)
    hash_k = H(hash_k-1, tokens[kB:kB+B], extra_keys)

``H`` is SHA-256 over a msgpack encoding, so equal hashes mean equal content:
no collision can hand one tenant's KV to another, and the salt, entering
through the root, changes every hash of the chain.

Per request the manager keeps its table and ``num_full_blocks``, the number of
leading table entries that are full once the tokens scheduled so far are
computed (block_size 4, 13 tokens scheduled)::

    table    [ b7 | b2 | b9 | b4 ]
               full full full  1 of 4 tokens
              `-- num_full_blocks = 3 --'

Blocks left of the mark were registered in the cache at scheduling time (or
were hits, or were shared by a fork); the block past it is being filled and is
never registered, so a partial block is never shared.
``request.block_hashes`` is the hash of each full block of ``request.token_ids``,
extended lazily as tokens are appended; it survives ``free`` so a preempted
request finds its own blocks again when re-admitted. ``token_ids`` must only
grow (the scheduler appends sampled tokens).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence

import msgspec

from loomserve.scheduler.block_pool import BlockPool
from loomserve.scheduler.request import Request

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_ROOT_DOMAIN = "loomserve/kv-prefix-root/v1"

ExtraKeys = tuple[str | int | bytes, ...]


@functools.lru_cache(maxsize=4096)
def root_block_hash(cache_salt: str) -> bytes:
    """The parent of a tenant's first block. The empty salt is the default (shared) tenant."""
    return hashlib.sha256(_encode((_ROOT_DOMAIN, cache_salt))).digest()


def hash_block_tokens(
    parent_hash: bytes, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
) -> bytes:
    """Hash of one full block: its parent's hash, its token ids and whatever else shapes its KV.

    ``extra_keys`` (a LoRA adapter name, a multimodal input's digest, ...) are
    encoded with their types, so ``1``, ``"1"`` and ``b"1"`` differ.
    """
    return hashlib.sha256(_encode((parent_hash, token_ids, extra_keys))).digest()


class _BlockTable:
    __slots__ = ("block_ids", "num_full_blocks", "quiet_limit", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.block_ids: list[int] = []
        self.num_full_blocks = 0
        # Up to this many scheduled tokens, allocate_slots has nothing to do: no block
        # to add, none filled to register. Most decodes stay below it (see _set_quiet_limit).
        self.quiet_limit = 0


class KVCacheManager:
    """Which KV blocks each request holds, and which cached blocks a new request can reuse."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, _BlockTable] = {}
        # Counted once per admission (a request's first allocate_slots), not per lookup:
        # a head-of-line request retried every step is one query.
        self.prefix_cache_queries = 0  # tokens of admitted requests
        self.prefix_cache_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def max_tokens_ever(self) -> int:
        return self.num_blocks * self.block_size

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of ``request`` in full blocks: (block ids, their token count).

        At most ``(num_tokens - 1) // block_size`` blocks, so at least one token
        is left to compute and produce logits. Takes no reference.
        """
        if not self.enable_prefix_caching:
            return [], 0
        num_tokens = request.num_tokens
        max_hit_blocks = (num_tokens - 1) // self.block_size
        block_hashes = self._block_hashes(request, max_hit_blocks)
        hit_ids = []
        for block_hash in block_hashes[:max_hit_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hit_ids.append(block_id)
        return hit_ids, len(hit_ids) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Make room for the computed tokens, the new computed blocks and ``num_new_tokens``.

        ``new_computed_blocks`` (from get_computed_blocks, only while the request
        holds no block) are referenced first, so allocating fresh blocks cannot
        evict them. Returns the ids appended to the table by this call, computed
        ones first, or None, changing nothing, if too few blocks are free.
        Blocks full once these tokens are computed are registered in the cache now.
        The first call for a request (its admission) counts its tokens as prefix-cache
        queries and its computed blocks as hits.
        """
        table = self._tables.get(request.request_id)
        if (
            table is not None
            and not new_computed_blocks
            and request.num_computed_tokens + num_new_tokens <= table.quiet_limit
        ):
            return []  # the common decode: its slot is in the last block, which stays partial
        is_new = table is None
        if table is None:
            table = _BlockTable(request)
        block_size = self.block_size
        computed_ids = new_computed_blocks or []
        if computed_ids and (table.block_ids or request.num_computed_tokens):
            raise ValueError(
                f"{request.request_id}: computed blocks are only taken by a request holding none"
            )
        num_tokens = request.num_computed_tokens + len(computed_ids) * block_size + num_new_tokens
        num_fresh = -(-num_tokens // block_size) - len(table.block_ids) - len(computed_ids)

        appended: list[int] | None
        if computed_ids:
            appended = self._take_computed_blocks(table, computed_ids, max(num_fresh, 0))
            if appended is None:
                return None
        elif num_fresh > 0:
            if num_fresh > self.pool.num_free_blocks:
                return None
            appended = self.pool.allocate(num_fresh)
            table.block_ids.extend(appended)
        else:
            appended = []
        if is_new:
            self._tables[request.request_id] = table
            if self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(computed_ids) * block_size

        num_full_blocks = min(num_tokens, request.num_tokens) // block_size
        if num_full_blocks > table.num_full_blocks:
            if self.enable_prefix_caching:
                self._register_full_blocks(table, num_full_blocks)
            table.num_full_blocks = num_full_blocks
        self._set_quiet_limit(table)
        return appended

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds none)."""
        table = self._tables.get(request_id)
        return list(table.block_ids) if table is not None else []

    def free(self, request: Request) -> None:
        """Drop the request's references. Its blocks are queued for eviction last block first,
        since a later request is likelier to share the beginning of a sequence than its end."""
        table = self._tables.pop(request.request_id, None)
        if table is None:
            return
        self.pool.release(reversed(table.block_ids))

    def fork(self, parent: Request, child: Request) -> list[tuple[int, int]] | None:
        """Give ``child`` the computed KV of ``parent`` (parallel sampling).

        Full blocks are shared; the partially filled last block is copied on
        write into a fresh block. Returns the ``(src, dst)`` copies the worker
        must make before the child's next step, or None, changing nothing, if
        no block is free for the copy.
        """
        parent_table = self._tables.get(parent.request_id)
        if parent_table is None:
            raise ValueError(f"{parent.request_id} holds no blocks to fork")
        if child.request_id in self._tables:
            raise ValueError(f"{child.request_id} already holds blocks")
        num_computed = parent.num_computed_tokens
        if (
            child.cache_salt != parent.cache_salt
            or child.token_ids[:num_computed] != parent.token_ids[:num_computed]
        ):
            raise ValueError(f"{child.request_id} does not continue {parent.request_id}")
        num_shared, num_partial_tokens = divmod(num_computed, self.block_size)
        copies: list[tuple[int, int]] = []
        child_table = _BlockTable(child)
        child_table.block_ids = parent_table.block_ids[:num_shared]
        if num_partial_tokens:
            if self.pool.num_free_blocks == 0:
                return None
            (copy_id,) = self.pool.allocate(1)
            copies.append((parent_table.block_ids[num_shared], copy_id))
            child_table.block_ids.append(copy_id)
        for block_id in child_table.block_ids[:num_shared]:
            self.pool.take_reference(block_id)
        child_table.num_full_blocks = num_shared
        self._set_quiet_limit(child_table)
        if self.enable_prefix_caching:
            child.block_hashes = parent.block_hashes[:num_shared]
        child.num_computed_tokens = num_computed
        self._tables[child.request_id] = child_table
        return copies

    def transfer(self, source: Request, target: Request) -> None:
        """Hand ``source``'s blocks and progress to ``target``, which continues the same tokens.

        The last child of a fork takes its parent's table this way: the parent's
        partial block is then written by one sequence only and needs no copy.
        """
        table = self._tables.pop(source.request_id, None)
        if table is None:
            raise ValueError(f"{source.request_id} holds no blocks to hand over")
        if target.request_id in self._tables:
            raise ValueError(f"{target.request_id} already holds blocks")
        num_computed = source.num_computed_tokens
        if target.cache_salt != source.cache_salt or target.token_ids[:num_computed] != source.token_ids[:num_computed]:
            self._tables[source.request_id] = table
            raise ValueError(f"{target.request_id} does not continue {source.request_id}")
        table.request = target
        if self.enable_prefix_caching:
            target.block_hashes = source.block_hashes[: table.num_full_blocks]
        target.num_computed_tokens = num_computed
        self._tables[target.request_id] = table

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is referenced."""
        if not self.pool.forget_all_hashes():
            return False
        log.info("prefix cache reset")
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables, the reference counts and the cache disagree."""
        self.pool.check_invariants()
        blocks = self.pool.blocks
        holders: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            ids = table.block_ids
            assert len(set(ids)) == len(ids), f"{request_id} holds a block twice: {ids}"
            holders.update(ids)
            assert table.num_full_blocks <= len(ids), f"{request_id}: full mark past its table"
            assert table.quiet_limit == min(len(ids), table.num_full_blocks + 1) * self.block_size - 1, (
                f"{request_id}: stale quiet limit"
            )
            request = table.request
            assert len(request.block_hashes) <= request.num_tokens // self.block_size
            parent = root_block_hash(request.cache_salt)
            for index, block_hash in enumerate(request.block_hashes):
                start = index * self.block_size
                parent = hash_block_tokens(parent, request.token_ids[start : start + self.block_size])
                assert block_hash == parent, f"{request_id}: hash of block {index} is stale"
            for index, block_id in enumerate(ids):
                cached_hash = blocks[block_id].block_hash
                if cached_hash is None:
                    continue
                assert index < table.num_full_blocks, f"{request_id}: partial {block_id} cached"
                assert cached_hash == request.block_hashes[index], (
                    f"{request_id}: block {block_id} is cached for other tokens"
                )
        for block in blocks:
            assert block.ref_count == holders[block.block_id], (
                f"{block!r} is held by {holders[block.block_id]} tables"
            )
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks
        if not self.enable_prefix_caching:
            assert self.pool.num_cached_blocks == 0, "blocks cached with prefix caching off"
            assert self.prefix_cache_queries == self.prefix_cache_hits == 0

    def _take_computed_blocks(
        self, table: _BlockTable, computed_ids: list[int], num_fresh: int
    ) -> list[int] | None:
        """Start the empty ``table`` with the computed blocks and ``num_fresh`` new ones.

        None if they don't fit: a computed block that is free now counts
        against the free blocks too, since referencing it takes it out of the queue.
        """
        pool = self.pool
        request = table.request
        num_revived = 0
        for index, block_id in enumerate(computed_ids):
            block = pool.blocks[block_id]
            if block.block_hash is None or block.block_hash != request.block_hashes[index]:
                raise ValueError(f"{request.request_id}: block {block_id} was evicted")
            num_revived += block.ref_count == 0
        if num_revived + num_fresh > pool.num_free_blocks:
            return None
        for block_id in computed_ids:
            pool.take_reference(block_id)
        appended = computed_ids + pool.allocate(num_fresh)
        table.block_ids.extend(appended)
        table.num_full_blocks = len(computed_ids)
        return appended

    def _set_quiet_limit(self, table: _BlockTable) -> None:
        """Scheduled tokens up to the limit fit the table's blocks and fill no block past
        ``num_full_blocks``, so allocate_slots can return at once (registration waits for
        a block to fill: the limit stops one token short of that)."""
        block_size = self.block_size
        table.quiet_limit = min(len(table.block_ids), table.num_full_blocks + 1) * block_size - 1

    def _register_full_blocks(self, table: _BlockTable, num_full_blocks: int) -> None:
        block_hashes = self._block_hashes(table.request, num_full_blocks)
        block_ids = table.block_ids
        for index in range(table.num_full_blocks, num_full_blocks):
            self.pool.register(block_ids[index], block_hashes[index])

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """``request.block_hashes``, extended to cover at least its first ``num_blocks`` blocks."""
        block_hashes = request.block_hashes
        block_size = self.block_size
        token_ids = request.token_ids
        parent = block_hashes[-1] if block_hashes else root_block_hash(request.cache_salt)
        for index in range(len(block_hashes), num_blocks):
            start = index * block_size
            parent = hash_block_tokens(parent, token_ids[start : start + block_size])
            block_hashes.append(parent)
        return block_hashes
