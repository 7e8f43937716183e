"""Seeded randomized test of KVCacheManager against a shadow model of block contents.

A tiny vocabulary, small blocks and few of them make prefixes collide, blocks get
shared and cached blocks get evicted on almost every step. The simulation plays
scheduler and worker: it admits (with prefix-cache hits), runs chunked prefills
and decodes, forks, finishes, aborts and preempts requests, and "computes" each
scheduled token by writing it into a shadow copy of the block it lands in. A fork
is followed, at times, by the parent handing its table to another request
(``transfer``, as the last choice of parallel sampling takes it).

Checked after every operation:
  * check_invariants holds, and free + used = total;
  * each request's block table equals the shadow's, and every block in it holds
    exactly that request's tokens (so a referenced block is never overwritten or
    handed to someone else);
  * a fresh block is in no other table; a block is shared only through a
    prefix-cache hit (same tenant, same full content) or a fork;
  * only the token being written, by the one request holding its block, changes
    a block.
"""

import random
from dataclasses import dataclass

import pytest

from loomserve.scheduler.kv_cache_manager import KVCacheManager, hash_block_tokens, root_block_hash
from loomserve.scheduler.request import Request
from loomserve.shared.messages import SamplingParams

TENANTS = ("", "tenant-a")


@dataclass
class Counts:
    hits: int = 0
    evictions: int = 0
    refused: int = 0
    preemptions: int = 0
    forks_with_copy: int = 0
    transfers: int = 0
    shared_blocks_seen: int = 0


class Simulation:
    def __init__(self, seed: int, block_size: int, num_blocks: int, vocab_size: int, caching: bool):
        self.rng = random.Random(seed)
        self.block_size = block_size
        self.vocab = list(range(vocab_size))
        self.caching = caching
        self.manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.running: dict[str, Request] = {}  # requests holding blocks
        self.waiting: list[Request] = []  # new or preempted: holding none
        self.tables: dict[str, list[int]] = {}  # shadow block tables
        self.content: dict[int, list[int]] = {}  # block id -> tokens the "worker" wrote into it
        self.writer_tenant: dict[int, str] = {}  # block id -> tenant whose request wrote it
        # Block id -> the tokens before it when written: its KV depends on them too.
        self.context: dict[int, list[int]] = {}
        self.next_id = 0
        self.counts = Counts()

    # -- operations ----------------------------------------------------------

    def add_request(self) -> None:
        length = self.rng.randint(1, 4 * self.block_size + 1)
        prompt = [self.rng.choice(self.vocab) for _ in range(length)]
        request = Request(
            f"r{self.next_id}", prompt, SamplingParams(max_tokens=8), cache_salt=self.rng.choice(TENANTS)
        )
        self.next_id += 1
        self.waiting.append(request)

    def admit(self) -> None:
        if not self.waiting:
            return self.add_request()
        request = self.waiting[self.rng.randrange(len(self.waiting))]
        hit_ids, num_hit_tokens = self.manager.get_computed_blocks(request)
        bs = self.block_size
        assert num_hit_tokens == len(hit_ids) * bs
        assert len(hit_ids) <= (request.num_tokens - 1) // bs
        for index, block_id in enumerate(hit_ids):
            # A hit holds exactly this tenant's tokens for that block, after the same
            # prefix: the cache never lies.
            assert self.content[block_id] == request.token_ids[index * bs : (index + 1) * bs]
            assert self.context[block_id] == request.token_ids[: index * bs]
            assert self.writer_tenant[block_id] == request.cache_salt
        self.counts.hits += len(hit_ids)
        if self.caching:
            assert request.block_hashes == self.expected_chain(request)[: len(request.block_hashes)]
        num_new = self.rng.randint(1, request.num_tokens - num_hit_tokens)
        appended = self.allocate(request, num_new, hit_ids)
        if appended is None:
            assert request.request_id not in self.tables
            return
        self.waiting.remove(request)
        self.running[request.request_id] = request
        request.num_computed_tokens = num_hit_tokens
        self.compute(request, num_new)

    def step(self) -> None:
        if not self.running:
            return self.admit()
        request = self.pick_running()
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(self.rng.choice(self.vocab))  # the token just sampled
        num_new = self.rng.randint(1, request.num_tokens - request.num_computed_tokens)
        if self.allocate(request, num_new, []) is None:
            self.preempt(request)
            return
        self.compute(request, num_new)

    def fork(self) -> None:
        if not self.running:
            return self.admit()
        parent = self.pick_running()
        child = Request(
            f"r{self.next_id}",
            list(parent.prompt_token_ids),
            parent.sampling,
            cache_salt=parent.cache_salt,
            token_ids=list(parent.token_ids),
        )
        self.next_id += 1
        num_free = self.manager.num_free_blocks
        copies = self.manager.fork(parent, child)
        bs = self.block_size
        num_shared, num_partial = divmod(parent.num_computed_tokens, bs)
        if copies is None:
            assert num_partial and num_free == 0
            assert self.manager.get_block_ids(child.request_id) == []
            return
        parent_table = self.tables[parent.request_id]
        child_table = parent_table[:num_shared]
        if num_partial:
            ((src, dst),) = copies
            assert src == parent_table[num_shared]
            assert not self.holders(dst), "the copy-on-write target is in use"
            self.content[dst] = list(self.content[src])
            self.context[dst] = list(self.context[src])
            self.writer_tenant[dst] = parent.cache_salt
            child_table.append(dst)
            self.counts.forks_with_copy += 1
        else:
            assert copies == []
        assert child.num_computed_tokens == parent.num_computed_tokens
        self.tables[child.request_id] = child_table
        self.running[child.request_id] = child
        if self.rng.random() < 0.5:
            self.transfer(parent)

    def transfer(self, source: Request) -> None:
        """``source`` hands its table to a new request with the same tokens and ends."""
        target = Request(f"r{self.next_id}", list(source.prompt_token_ids), source.sampling,
                         cache_salt=source.cache_salt, token_ids=list(source.token_ids))
        self.next_id += 1
        self.manager.transfer(source, target)
        assert self.manager.get_block_ids(source.request_id) == []
        assert target.num_computed_tokens == source.num_computed_tokens
        self.tables[target.request_id] = self.tables.pop(source.request_id)
        del self.running[source.request_id]
        self.running[target.request_id] = target
        self.counts.transfers += 1

    def finish(self, abort_waiting: bool = False) -> None:
        if abort_waiting and self.waiting:
            request = self.waiting.pop(self.rng.randrange(len(self.waiting)))
            self.manager.free(request)  # holds nothing: a no-op
            return
        if not self.running:
            return
        request = self.pick_running()
        self.manager.free(request)
        del self.running[request.request_id]
        del self.tables[request.request_id]

    def preempt(self, request: Request) -> None:
        self.manager.free(request)
        del self.running[request.request_id]
        del self.tables[request.request_id]
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.append(request)
        self.counts.preemptions += 1

    def reset_cache(self) -> None:
        done = self.manager.reset_prefix_cache()
        assert done == (not self.running)

    # -- the model of the worker ----------------------------------------------

    def allocate(self, request: Request, num_new: int, hit_ids: list[int]) -> list[int] | None:
        manager = self.manager
        free_cached = {b.block_id for b in manager.pool.free_queue if b.block_hash is not None}
        num_free = manager.num_free_blocks
        table_before = list(self.tables.get(request.request_id, []))
        appended = manager.allocate_slots(request, num_new, hit_ids)
        if appended is None:
            self.counts.refused += 1
            assert manager.num_free_blocks == num_free
            assert manager.get_block_ids(request.request_id) == table_before
            return None
        assert appended[: len(hit_ids)] == hit_ids
        fresh = appended[len(hit_ids) :]
        first_fresh_index = len(table_before) + len(hit_ids)
        for index, block_id in enumerate(fresh, start=first_fresh_index):
            assert not self.holders(block_id), f"block {block_id} handed out while in use"
            self.content[block_id] = []
            self.context[block_id] = request.token_ids[: index * self.block_size]
            self.writer_tenant[block_id] = request.cache_salt
        self.counts.evictions += len(free_cached.intersection(fresh))
        self.tables[request.request_id] = table_before + appended
        return appended

    def compute(self, request: Request, num_new: int) -> None:
        bs = self.block_size
        table = self.tables[request.request_id]
        start = request.num_computed_tokens
        for position in range(start, start + num_new):
            block_id = table[position // bs]
            assert self.manager.pool.blocks[block_id].ref_count == 1, "writing into a shared block"
            assert len(self.content[block_id]) == position % bs
            self.content[block_id].append(request.token_ids[position])
        request.num_computed_tokens += num_new

    def holders(self, block_id: int) -> list[str]:
        return [rid for rid, table in self.tables.items() if block_id in table]

    def pick_running(self) -> Request:
        return self.rng.choice(list(self.running.values()))

    def expected_chain(self, request: Request) -> list[bytes]:
        parent, chain = root_block_hash(request.cache_salt), []
        for start in range(0, request.num_tokens - self.block_size + 1, self.block_size):
            parent = hash_block_tokens(parent, request.token_ids[start : start + self.block_size])
            chain.append(parent)
        return chain

    # -- checks ----------------------------------------------------------------

    def check(self) -> None:
        manager = self.manager
        manager.check_invariants()
        assert manager.num_free_blocks + manager.num_used_blocks == manager.num_blocks
        bs = self.block_size
        holders_of: dict[int, int] = {}
        for request_id, request in self.running.items():
            table = self.tables[request_id]
            assert manager.get_block_ids(request_id) == table
            computed = request.num_computed_tokens
            assert len(table) == -(-computed // bs)
            for index, block_id in enumerate(table):
                expected = request.token_ids[index * bs : min((index + 1) * bs, computed)]
                assert self.content[block_id] == expected, f"block {block_id} of {request_id}"
                assert self.context[block_id] == request.token_ids[: index * bs]
                assert self.writer_tenant[block_id] == request.cache_salt
                holders_of[block_id] = holders_of.get(block_id, 0) + 1
        for block in manager.pool.blocks:
            assert block.ref_count == holders_of.get(block.block_id, 0)
        self.counts.shared_blocks_seen += sum(1 for n in holders_of.values() if n > 1)

    def run(self, num_ops: int) -> Counts:
        operations = [
            (self.add_request, 3),
            (self.admit, 6),
            (self.step, 14),
            (self.fork, 1),
            (self.finish, 3),
            (lambda: self.finish(abort_waiting=True), 1),
            (lambda: self.preempt(self.pick_running()) if self.running else None, 1),
            (self.reset_cache, 0.05),
        ]
        functions = [op for op, _ in operations]
        weights = [weight for _, weight in operations]
        for _ in range(num_ops):
            operation = self.rng.choices(functions, weights)[0]
            operation()
            self.check()
            # Keep the population bounded so pressure comes from blocks, not from bookkeeping.
            while len(self.waiting) > 12:
                self.waiting.pop(0)
        return self.counts


CONFIGS = [
    # (seed, block_size, num_blocks, vocab_size, prefix caching, operations)
    (1, 2, 12, 2, True, 60_000),
    (2, 3, 10, 3, True, 20_000),
    (3, 4, 16, 2, True, 20_000),
    (4, 2, 8, 2, False, 10_000),
]  # 110,000 operations in all


@pytest.mark.parametrize(("seed", "block_size", "num_blocks", "vocab", "caching", "num_ops"), CONFIGS)
def test_random_operations_keep_every_invariant(
    seed: int, block_size: int, num_blocks: int, vocab: int, caching: bool, num_ops: int
) -> None:
    counts = Simulation(seed, block_size, num_blocks, vocab, caching).run(num_ops)
    # The run must have exercised what it checks.
    assert counts.refused > 100 and counts.preemptions > 100 and counts.forks_with_copy > 100
    assert counts.transfers > 100
    assert counts.shared_blocks_seen > 1_000
    if caching:
        assert counts.hits > 1_000 and counts.evictions > 1_000
