"""Physical KV cache blocks: reference counts, the free queue and the prefix-cache index.

The pool knows nothing about tokens or requests; it hands out block ids, counts
who holds each block, and maps a block hash (opaque bytes chosen by the caller)
to the one block holding that content. Every block is in exactly one state::

    state         ref_count   in free queue   block_hash
    ------------  ---------   -------------   ---------------------------------
    in use        >= 1        no              None, or a hash it is indexed by
    free, cached  0           yes             a hash it is indexed by
    free, empty   0           yes             None

A hash indexes at most one block and a block carries at most one hash
(``block.block_hash == h``  <=>  ``index[h] is block``). A free cached block can
still be found by its hash and taken back into use; it loses its hash only when
it is handed out again as a fresh block (evicted) or the whole index is dropped.

The free queue is the eviction order; its head is the next block handed out::

    head -> [empty blocks ...][cached blocks, least recently freed first] <- tail

Empty blocks are put at the front (reusing them costs no cached content) and
cached ones at the back, so the queue always has that two-part shape. Every
queue operation is O(1): the links live in the blocks themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class KVBlock:
    """One block of KV cache slots. The free-queue links are ``None`` while in use."""

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: bytes | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        cached = self.block_hash is not None
        return f"KVBlock({self.block_id}, ref={self.ref_count}, cached={cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks between two sentinels; O(1) at both ends and in the middle.

    A block is in the queue iff its ``prev_free`` link is set (sentinels keep
    every member's links non-None, so membership needs no search).
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._length = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None or block.next_free is None:
            raise IndexError("pop from an empty free block queue")
        self._head.next_free = block.next_free
        block.next_free.prev_free = self._head
        block.prev_free = block.next_free = None
        self._length -= 1
        return block

    def remove(self, block: KVBlock) -> None:
        prev_block, next_block = block.prev_free, block.next_free
        if prev_block is None or next_block is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self._length -= 1

    def append(self, block: KVBlock) -> None:
        self._link_after(self._tail.prev_free, block)

    def appendleft(self, block: KVBlock) -> None:
        self._link_after(self._head, block)

    def _link_after(self, anchor: KVBlock | None, block: KVBlock) -> None:
        if block.prev_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        assert anchor is not None and anchor.next_free is not None
        block.prev_free = anchor
        block.next_free = anchor.next_free
        anchor.next_free.prev_free = block
        anchor.next_free = block
        self._length += 1


class BlockPool:
    """``num_blocks`` blocks with ids ``0 .. num_blocks - 1``, all free and empty at the start."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self._index: dict[bytes, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash, in use or free."""
        return len(self._index)

    def allocate(self, count: int) -> list[int]:
        """Hand out ``count`` blocks from the head of the free queue, each with one reference.

        A cached block taken this way is evicted: its hash is forgotten.
        """
        free_queue = self.free_queue
        if count > len(free_queue):
            raise ValueError(f"asked for {count} blocks, {len(free_queue)} free")
        allocated = []
        for _ in range(count):
            block = free_queue.popleft()
            if block.block_hash is not None:
                del self._index[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            allocated.append(block.block_id)
        return allocated

    def take_reference(self, block_id: int) -> None:
        """Share a block (a prefix-cache hit or a fork); a free block leaves the free queue."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free_queue.remove(block)
        block.ref_count += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block; those that reach 0 join the free queue.

        Blocks are given in the order they should be evicted among themselves:
        cached ones are appended in that order, empty ones go to the front.
        """
        blocks = self.blocks
        for block_id in block_ids:
            block = blocks[block_id]
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} released more often than referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def lookup(self, block_hash: bytes) -> int | None:
        """The id of the block holding ``block_hash``, in use or free; None if none does."""
        block = self._index.get(block_hash)
        return None if block is None else block.block_id

    def register(self, block_id: int, block_hash: bytes) -> bool:
        """Index an in-use block by ``block_hash``; False if another block already holds that hash.

        The loser of such a race (two requests computing the same content at
        once) simply stays unindexed and is recycled first once freed.
        """
        block = self.blocks[block_id]
        if block.ref_count == 0 or block.block_hash is not None:
            raise ValueError(f"block {block.block_id} cannot be registered: {block!r}")
        if block_hash in self._index:
            return False
        block.block_hash = block_hash
        self._index[block_hash] = block
        return True

    def forget_all_hashes(self) -> bool:
        """Empty the prefix-cache index; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self._index.values():
            block.block_hash = None
        self._index.clear()
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError if the state table in the module docstring does not hold."""
        queued = list(self.free_queue)
        assert len(queued) == len(self.free_queue), "free queue length counter is off"
        assert len({block.block_id for block in queued}) == len(queued), "block queued twice"
        seen_cached = False
        for block in queued:
            assert block.ref_count == 0, f"{block!r} is queued while referenced"
            assert block.prev_free is not None and block.next_free is not None
            assert block.prev_free.next_free is block and block.next_free.prev_free is block
            if block.block_hash is None:
                assert not seen_cached, f"empty {block!r} queued behind a cached block"
            else:
                seen_cached = True
        for block in self.blocks:
            assert block.ref_count >= 0, f"{block!r} has a negative reference count"
            in_queue = block.prev_free is not None
            assert in_queue == (block.ref_count == 0), f"{block!r}: queue membership is off"
            if block.block_hash is not None:
                assert self._index.get(block.block_hash) is block, f"{block!r} is not indexed"
        for block_hash, block in self._index.items():
            assert block.block_hash == block_hash, f"hash index points at {block!r}"
