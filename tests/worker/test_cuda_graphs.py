"""CUDA graphs of decode and of mixed steps: bucket choice and padding (anywhere),
replay against eager (GPU).

On the CPU the padded batches run eagerly through ``run_eager`` on a tiny random
model, which checks that padding rows change nothing for the real ones; mixed
steps run there through the Triton attention backend under the interpreter, since
their static layout is what that backend reads. The ``gpu`` tests load dummy
weights at the Llama-3.2-1B shape through the real model runner (bf16, Triton
kernels, graphs captured at start-up).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loomserve.local_engine import LocalEngine
from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.request import Request
from loomserve.scheduler.scheduler import Scheduler
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.shared.messages import BatchPlan, SamplingParams, StepResult
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.attention.triton_backend import TritonAttentionBackend
from loomserve.worker.cuda_graphs import (
    DECODE_BUCKETS,
    MIXED_BUCKETS,
    PAD_SEQ_LEN,
    PAD_SLOT,
    DecodeGraphs,
    MixedGraphs,
    PaddedDecode,
    bucket_for,
    decode_buckets,
    mixed_buckets,
    pad_decode_batch,
)
from loomserve.worker.device import DeviceInfo
from loomserve.worker.kv_cache import allocate_kv_caches
from loomserve.worker.loader import load_model
from loomserve.worker.model_runner import LaunchedStep, ModelRunner
from loomserve.worker.models.llama import LlamaForCausalLM

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

TINY_CONFIG = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def test_buckets_cover_every_batch_up_to_256() -> None:
    assert DECODE_BUCKETS[:4] == (1, 2, 4, 8) and DECODE_BUCKETS[-1] == 256
    assert list(DECODE_BUCKETS) == sorted(set(DECODE_BUCKETS))
    for n in range(1, 257):
        bucket = bucket_for(n, DECODE_BUCKETS)
        assert bucket is not None and n <= bucket
        assert bucket == n or bucket - n < max(n // 2 + 1, 8), (n, bucket)  # padding stays small
    assert [bucket_for(n, DECODE_BUCKETS) for n in (1, 3, 5, 9, 17, 250)] == [1, 4, 8, 16, 24, 256]
    assert bucket_for(257, DECODE_BUCKETS) is None


@pytest.mark.parametrize("max_seqs", [1, 3, 8, 9, 100, 256, 257, 300, 512, 1000])
def test_decode_buckets_end_at_the_first_that_holds_max_seqs(max_seqs: int) -> None:
    buckets = decode_buckets(max_seqs)
    assert list(buckets) == sorted(set(buckets)) and buckets[0] == 1
    assert buckets[-1] >= max_seqs and (len(buckets) == 1 or buckets[-2] < max_seqs)
    assert buckets == DECODE_BUCKETS[: len(buckets)] or max_seqs > 256
    for n in range(1, max_seqs + 1):
        bucket = bucket_for(n, buckets)
        assert bucket is not None and n <= bucket
        assert bucket - n < (max(n // 2 + 1, 8) if n <= 256 else 16), (n, bucket)


def test_decode_buckets_beyond_256() -> None:
    assert decode_buckets(256) == DECODE_BUCKETS
    assert decode_buckets(512)[len(DECODE_BUCKETS):] == tuple(range(272, 513, 16))
    assert decode_buckets(300)[-2:] == (288, 304)
    with pytest.raises(ValueError, match="at least 1"):
        decode_buckets(0)


# input_ids, positions, slot_mapping, seq_lens, block_tables: pad_decode_batch's arguments
DecodeBatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def random_decode(
    n: int, rng: np.random.Generator, *, num_blocks: int, block_size: int, max_len: int, vocab: int
) -> DecodeBatch:
    """(input_ids, positions, slot_mapping, seq_lens, block_tables) of ``n`` decodes over
    distinct, scattered blocks."""
    seq_lens = rng.integers(1, max_len + 1, n).astype(np.int32)
    blocks_each = -(-seq_lens // block_size)
    blocks = rng.permutation(num_blocks)[: int(blocks_each.sum())]
    tables = np.zeros((n, int(blocks_each.max())), dtype=np.int32)
    used = 0
    for i, k in enumerate(blocks_each):
        tables[i, :k] = blocks[used : used + k]
        used += k
    positions = seq_lens.astype(np.int64) - 1
    slots = tables[np.arange(n), positions // block_size].astype(np.int64) * block_size + positions % block_size
    input_ids = rng.integers(0, vocab, n).astype(np.int64)
    return input_ids, positions, slots, seq_lens, tables


def test_padding_rows() -> None:
    ids = np.array([5, 6, 7])
    positions = np.array([10, 0, 33])
    slots = np.array([170, 16, 81])
    seq_lens = np.array([11, 1, 34], dtype=np.int32)
    tables = np.array([[3, 10, 0], [1, 0, 0], [7, 8, 5]], dtype=np.int32)
    padded = pad_decode_batch(ids, positions, slots, seq_lens, tables, 8, pin=False)
    assert padded.bucket == 8 and padded.num_seqs == 3
    assert padded.token_data.tolist() == [
        [5, 6, 7, 0, 0, 0, 0, 0],
        [10, 0, 33, 0, 0, 0, 0, 0],
        [170, 16, 81, PAD_SLOT, PAD_SLOT, PAD_SLOT, PAD_SLOT, PAD_SLOT],
    ]
    assert padded.seq_lens.tolist() == [11, 1, 34] + [PAD_SEQ_LEN] * 5
    assert padded.block_tables.tolist() == tables.tolist() + [[0, 0, 0]] * 5
    with pytest.raises(ValueError, match="does not fit"):
        pad_decode_batch(ids, positions, slots, seq_lens, tables, 2, pin=False)


def eager_decode(
    model: LlamaForCausalLM, kv_caches: list[torch.Tensor], batch: DecodeBatch, max_seq_len: int | None = None
) -> torch.Tensor:
    """The unpadded batch through the model, as the runner's eager path runs it: (n, hidden).
    ``max_seq_len`` (default: the batch's) only picks the decode kernel's split count."""
    input_ids, positions, slots, seq_lens, tables = batch
    n = len(input_ids)
    dev = kv_caches[0].device
    meta = AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.from_numpy(seq_lens).to(dev),
        block_tables=torch.from_numpy(tables).to(dev),
        slot_mapping=torch.from_numpy(slots).to(dev),
        max_query_len=1,
        max_seq_len=int(seq_lens.max()) if max_seq_len is None else max_seq_len,
        query_start_loc_cpu=list(range(n + 1)),
        seq_lens_cpu=seq_lens.tolist(),
    )
    return model(torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev), kv_caches, meta)


@torch.inference_mode()
def test_padded_decode_equals_unpadded_on_cpu(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    model, config = load_model(tmp_path, load_format="dummy", seed=1)
    block_size, num_blocks, max_len = 4, 200, 40
    kv_caches = allocate_kv_caches(config, num_blocks, block_size, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    for cache in kv_caches:
        cache.normal_(generator=gen)
    graphs = DecodeGraphs(model, kv_caches, max_seq_len=max_len, block_size=block_size, buckets=(1, 2, 4, 8))
    rng = np.random.default_rng(0)
    for n in (1, 3, 5, 8):
        batch = random_decode(n, rng, num_blocks=num_blocks, block_size=block_size, max_len=max_len, vocab=256)
        bucket = graphs.bucket_for(n)
        assert bucket is not None
        padded: PaddedDecode = pad_decode_batch(*batch, bucket, pin=False)
        before = [cache.clone() for cache in kv_caches]
        out = graphs.run_eager(padded)
        assert out.shape == (bucket, config.hidden_size) and bool(out.isfinite().all())
        # Only the real rows' slots were written: the padding rows write nothing.
        changed = set()
        for old, new in zip(before, kv_caches, strict=True):
            diff = (old != new).reshape(2, num_blocks * block_size, -1).any(dim=2).any(dim=0)
            changed |= set(diff.nonzero().flatten().tolist())
        assert changed <= set(batch[2].tolist())
        ref = eager_decode(model, kv_caches, batch)
        torch.testing.assert_close(out[:n], ref, rtol=1e-5, atol=1e-5)


# --- mixed steps ----------------------------------------------------------------


def test_mixed_buckets_keep_padding_small() -> None:
    assert list(MIXED_BUCKETS) == sorted(set(MIXED_BUCKETS))
    assert mixed_buckets(0) == ()
    assert mixed_buckets(2048)[-1] == 2048 and mixed_buckets(1000)[-1] == 1000
    assert mixed_buckets(16) == (16,)
    for n in range(1, 8193):
        bucket = bucket_for(n, mixed_buckets(8192))
        assert bucket is not None and n <= bucket
        # Under half of a step is padding, under a third above 256 tokens.
        assert (bucket - n) * (2 if bucket <= 256 else 3) < bucket or bucket == 16, (n, bucket)
    with pytest.raises(ValueError, match=">= 0"):
        mixed_buckets(-1)


# (query lengths, context lengths before the step) of the sequences of a mixed batch,
# decodes first as the model runner orders them.
MIXED_CASES = [
    ([5], [0]),  # one fresh prompt
    ([1, 1, 1, 7], [3, 9, 20, 0]),  # decodes, then a prompt
    ([1, 1, 13, 2], [30, 4, 5, 8]),  # decodes, then a chunk over a prefix and a short chunk
    ([1, 1, 1], [6, 7, 8]),  # all decodes, one of them a one-token prompt chunk (not sampled)
    ([20, 11], [0, 16]),
]


def random_mixed(
    query_lens: list[int], prefix_lens: list[int], rng: np.random.Generator, *, num_blocks: int, block_size: int,
    vocab: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(token_data (3, T), query_start_loc, seq_lens, block_tables) over distinct, scattered blocks."""
    seq_lens = np.asarray(prefix_lens) + np.asarray(query_lens)
    blocks_each = -(-seq_lens // block_size)
    blocks = rng.permutation(num_blocks)[: int(blocks_each.sum())]
    tables = np.zeros((len(query_lens), int(blocks_each.max())), dtype=np.int32)
    rows: list[np.ndarray] = []
    used = 0
    for i, (q, p) in enumerate(zip(query_lens, prefix_lens, strict=True)):
        tables[i, : blocks_each[i]] = blocks[used : used + blocks_each[i]]
        used += int(blocks_each[i])
        pos = np.arange(p, p + q)
        slots = tables[i, pos // block_size].astype(np.int64) * block_size + pos % block_size
        rows.append(np.stack([rng.integers(0, vocab, q), pos, slots]))
    starts = np.concatenate(([0], np.cumsum(query_lens))).astype(np.int32)
    return np.concatenate(rows, axis=1).astype(np.int64), starts, seq_lens.astype(np.int32), tables


def eager_step(model: LlamaForCausalLM, kv_caches: list[torch.Tensor], token_data: np.ndarray, starts: np.ndarray,
               seq_lens: np.ndarray, tables: np.ndarray) -> torch.Tensor:
    dev = kv_caches[0].device
    meta = AttentionMetadata(
        query_start_loc=torch.from_numpy(starts).to(dev),
        seq_lens=torch.from_numpy(seq_lens).to(dev),
        block_tables=torch.from_numpy(tables).to(dev),
        slot_mapping=torch.from_numpy(token_data[2]).to(dev),
        max_query_len=int(np.diff(starts).max()),
        max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=starts.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
    )
    data = torch.from_numpy(token_data).to(dev)
    return model(data[0], data[1], kv_caches, meta)


@pytest.mark.skipif(ON_GPU, reason="where CUDA is, the Triton kernels are compiled and need CUDA tensors")
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")  # the Triton interpreter's
@torch.inference_mode()
def test_padded_mixed_step_equals_unpadded_on_cpu(tmp_path: Path) -> None:
    """The static layout of a mixed graph (fixed decode rows, a work list, padding
    rows) gives the real rows what an eager forward over the unpadded batch gives,
    through the Triton kernels and through the torch reference backend alike, and
    writes only the real tokens' slots."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    model, config = load_model(tmp_path, load_format="dummy", seed=1, attn_backend=TritonAttentionBackend)
    reference, _ = load_model(tmp_path, load_format="dummy", seed=1)  # torch attention
    block_size, num_blocks, max_len = 4, 120, 48
    kv_caches = allocate_kv_caches(config, num_blocks, block_size, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    for cache in kv_caches:
        cache.normal_(generator=gen)
    graphs = MixedGraphs(model, kv_caches, max_seq_len=max_len, block_size=block_size, buckets=(16, 32),
                         max_seqs=6)
    rng = np.random.default_rng(0)
    for query_lens, prefix_lens in MIXED_CASES:
        token_data, starts, seq_lens, tables = random_mixed(
            query_lens, prefix_lens, rng, num_blocks=num_blocks, block_size=block_size, vocab=256
        )
        bucket = graphs.bucket_for(int(token_data.shape[1]), len(query_lens))
        assert bucket is not None
        step = graphs.pad(token_data, starts, seq_lens, tables, bucket, pin=False)
        before = [cache.clone() for cache in kv_caches]
        out = graphs.run_eager(step)
        assert out.shape == (bucket, config.hidden_size) and bool(out.isfinite().all())
        changed = set()
        for old, new in zip(before, kv_caches, strict=True):
            diff = (old != new).reshape(2, num_blocks * block_size, -1).any(dim=2).any(dim=0)
            changed |= set(diff.nonzero().flatten().tolist())
        assert changed <= set(token_data[2].tolist())
        n = int(token_data.shape[1])
        torch.testing.assert_close(out[:n], eager_step(model, kv_caches, token_data, starts, seq_lens, tables),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[:n], eager_step(reference, kv_caches, token_data, starts, seq_lens, tables),
                                   rtol=1e-4, atol=1e-4)
    assert graphs.bucket_for(33, 2) is None and graphs.bucket_for(10, 7) is None
    with pytest.raises(ValueError, match="does not fit"):
        graphs.pad(token_data, starts, seq_lens, tables, 16, pin=False)


# --- GPU -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_runner() -> ModelRunner:
    # Graphs for up to 320 sequences: past the default 256, where decode sizes step by 16.
    config = WorkerConfig(
        model="llama-3.2-1b", load_format="dummy", device="cuda", max_model_len=4096, gpu_memory_utilization=0.5,
        cuda_graph_max_seqs=320,
    )
    runner = ModelRunner(config, "llama-3.2-1b", DeviceInfo.resolve(config), SchedulerConfig().step_limits())
    gen = torch.Generator(device="cuda").manual_seed(0)
    for cache in runner.kv_caches:
        cache.normal_(generator=gen)  # attention over random context, not zeros
    return runner


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_replay_equals_eager_at_the_same_bucket(gpu_runner: ModelRunner, seed: int) -> None:
    """Graph replay and the same padded batch run eagerly: bit-identical hidden states
    and greedy tokens, for random decode batches of many sizes."""
    runner = gpu_runner
    graphs = runner.graphs
    assert graphs is not None and graphs.captured and graphs.buckets == list(decode_buckets(320))
    assert runner.graph_max_seqs == 320
    assert graphs.bucket_for(321) is None
    rng = np.random.default_rng(seed)
    sizes = [1, 2, 3, 7, 8, 9, 31, 64, 100, 255, 256, 257, 300, 320, *rng.integers(1, 321, 6).tolist()]
    with torch.inference_mode():
        for n in sizes:
            batch = random_decode(
                n, rng, num_blocks=runner.num_blocks, block_size=runner.block_size, max_len=2048,
                vocab=runner.model_config.vocab_size,
            )
            bucket = graphs.bucket_for(n)
            assert bucket is not None
            padded = pad_decode_batch(*batch, bucket, pin=True)
            replayed = graphs.replay(padded)[:n].clone()
            eager = graphs.run_eager(padded)[:n]
            assert torch.equal(replayed, eager), n
            tokens = runner.model.compute_logits(replayed).argmax(dim=-1)
            assert torch.equal(tokens, runner.model.compute_logits(eager).argmax(dim=-1)), n
            # The unpadded batch with the graphs' split count: identical when no row is
            # padding; otherwise other GEMM shapes and split counts round differently
            # (bf16 over 16 layers), while a padding bug would change rows entirely.
            ref = eager_decode(runner.model, runner.kv_caches, batch, max_seq_len=graphs.max_seq_len)
            if n == bucket:
                assert torch.equal(replayed, ref), n
            else:
                err = ((replayed.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 5e-2, (n, err)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_replay_equals_eager(gpu_runner: ModelRunner, seed: int) -> None:
    """Mixed-step graph replay and the same padded step run eagerly: bit-identical; and
    close to the unpadded eager step (other GEMM shapes and tiles round differently in
    bf16, while a layout bug would change rows entirely)."""
    runner = gpu_runner
    mixed = runner.mixed_graphs
    assert mixed is not None and mixed.captured and mixed.largest == 2048 and mixed.max_seqs == 320
    assert mixed.bucket_for(400, 321) is None
    rng = np.random.default_rng(seed)
    cases: list[list[int]] = [[1] * 255 + [300], [1] * 318 + [2, 900], [1] * 40 + [7, 900], [2000], [1, 1, 1, 1]]
    cases += [[1] * int(rng.integers(0, 200)) + rng.integers(2, 600, int(rng.integers(1, 4))).tolist()
              for _ in range(4)]
    with torch.inference_mode():
        for query_lens in cases:
            prefix_lens = rng.integers(0, 1500, len(query_lens)).tolist()
            token_data, starts, seq_lens, tables = random_mixed(
                query_lens, prefix_lens, rng, num_blocks=runner.num_blocks, block_size=runner.block_size,
                vocab=runner.model_config.vocab_size,
            )
            n = int(token_data.shape[1])
            bucket = mixed.bucket_for(n, len(query_lens))
            assert bucket is not None, query_lens
            step = mixed.pad(token_data, starts, seq_lens, tables, bucket, pin=True)
            replayed = mixed.replay(step)[:n].clone()
            eager = mixed.run_eager(step)[:n]
            assert torch.equal(replayed, eager), len(query_lens)
            ref = eager_step(runner.model, runner.kv_caches, token_data, starts, seq_lens, tables)
            err = ((replayed.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 5e-2, (len(query_lens), err)


@pytest.mark.gpu
@needs_gpu
def test_runner_replays_graphs_and_syncs_once_per_step(gpu_runner: ModelRunner) -> None:
    """Decode steps replay a decode graph, prefill and mixed steps a mixed graph, and no
    step synchronises with the device implicitly (the host waits for the sampled tokens
    on an event, once per step); clearing ``use_cuda_graphs`` turns replays off."""
    runner = gpu_runner
    graphs, mixed = runner.graphs, runner.mixed_graphs
    assert graphs is not None and mixed is not None
    runner.reset()
    scheduler = Scheduler(SchedulerConfig(), KVCacheManager(runner.num_blocks, runner.block_size), runner.max_model_len)
    rng = np.random.default_rng(3)
    for i in range(12):
        prompt = rng.integers(0, 32000, int(rng.integers(5, 300))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(4, 20)), temperature=0.0 if i % 2 else 0.8, seed=i)
        scheduler.add_request(Request(f"r{i}", prompt, params))
    decode_steps = 0
    while scheduler.has_work():
        plan = scheduler.schedule()
        assert plan is not None
        replays, mixed_replays = graphs.num_replays, mixed.num_replays
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                result = runner.execute(plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in record if "synchroniz" in str(w.message)]
        # A decode batch: one token for each request, and each one sampled.
        decode_only = len(result.request_ids) == sum(plan.num_scheduled_tokens.values())
        assert graphs.num_replays == replays + int(decode_only)
        assert mixed.num_replays == mixed_replays + int(not decode_only)
        decode_steps += decode_only
        assert syncs == []
        # The step's time split: host work and the wait for the tokens both fit in it.
        assert result.host_ms > 0.0 and result.wait_ms >= 0.0
        assert result.host_ms + result.wait_ms <= result.forward_ms + 0.05
        scheduler.update_from_output(result)
    assert 5 < decode_steps < mixed.num_replays + decode_steps
    runner.use_cuda_graphs = False
    try:
        replays, mixed_replays = graphs.num_replays, mixed.num_replays
        scheduler.add_request(Request("eager", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0)))
        while scheduler.has_work():
            plan = scheduler.schedule()
            assert plan is not None
            scheduler.update_from_output(runner.execute(plan))
        assert (graphs.num_replays, mixed.num_replays) == (replays, mixed_replays)
    finally:
        runner.use_cuda_graphs = True


@pytest.mark.gpu
@needs_gpu
def test_pipelined_steps_equal_the_same_plans_one_at_a_time(
    gpu_runner: ModelRunner, late_token_rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With asynchronous scheduling each step is launched before the last one's tokens are
    read, and its decodes take their input ids from the device (``LateTokens``, written into
    the graphs' static inputs). Run the same plans again one at a time, every input from the
    host: the tokens must be identical, bit for bit (same batches, same graphs). Launching
    and sampling never wait for the device; only reading the tokens does."""
    runner = gpu_runner
    engine = LocalEngine.over(runner, SchedulerConfig(async_scheduling=True))
    rng = np.random.default_rng(5)
    for i in range(24):
        prompt = rng.integers(0, 32000, int(rng.integers(3, 600))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(2, 40)), temperature=0.0 if i % 2 else 0.9, seed=i)
        engine.add_request(f"r{i}", prompt, params)
    plans: list[BatchPlan] = []
    results: list[StepResult] = []
    launch, sample, finalize = runner.launch, runner.sample, runner.finalize
    syncs: list[str] = []

    def quiet(call: Callable[[Any], Any], arg: Any) -> Any:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                out = call(arg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs.extend(str(w.message) for w in record if "synchroniz" in str(w.message))
        return out

    def recorded_launch(plan: BatchPlan) -> LaunchedStep:
        plans.append(plan)
        return quiet(launch, plan)

    def recorded_finalize(step: LaunchedStep) -> StepResult:
        results.append(finalize(step))
        return results[-1]

    replays_before = runner.graphs.num_replays if runner.graphs else 0
    try:
        runner.launch = recorded_launch  # type: ignore[method-assign]
        runner.sample = lambda step: quiet(sample, step)  # type: ignore[method-assign]
        runner.finalize = recorded_finalize  # type: ignore[method-assign]
        engine.run_until_idle()
    finally:
        del runner.launch, runner.sample, runner.finalize
    assert syncs == []
    assert runner.graphs is not None and runner.graphs.num_replays > replays_before + 20
    assert len(late_token_rows) > 20 and sum(late_token_rows) > 200
    monkeypatch.undo()
    runner.reset()
    again = [runner.execute(plan) for plan in plans]
    assert [r.sampled_token_ids for r in again] == [r.sampled_token_ids for r in results]
    assert [r.request_ids for r in again] == [r.request_ids for r in results]
