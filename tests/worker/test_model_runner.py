"""The model runner on the CPU, driven by hand-made ``BatchPlan``s, on the default model.

Every request's greedy tokens must equal a reference that recomputes the whole
sequence from scratch (one fresh prefill per token, no paging tricks), whatever
the runner went through: chunked prefill mixed with decodes, a prefix shared
through a copied block, a preemption and resumption, finished requests.
"""

from __future__ import annotations

import os
import random

import msgspec
import pytest
import torch

from loomserve.local_engine import LocalEngine
from loomserve.scheduler.kv_cache_manager import KVCacheManager
from loomserve.scheduler.request import Request
from loomserve.scheduler.scheduler import Scheduler
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.shared.messages import BatchPlan, CachedRequestData, NewRequestData, SamplingParams
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.attention.torch_backend import TorchAttentionBackend
from loomserve.worker.device import DeviceInfo
from loomserve.worker.kv_cache import allocate_kv_caches
from loomserve.worker.model_runner import ModelRunner, PinnedSlots

if not torch.cuda.is_available():
    # The Triton backend test below runs the kernels under the interpreter, which must
    # be chosen before the kernel modules are imported (see tests/kernels/conftest.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

BLOCK_SIZE = 4
GREEDY = SamplingParams(max_tokens=64, temperature=0.0)

# Tokenised with the model's own tokenizer (as in models/test_llama.py).
PROMPTS = {
    "france": [504, 3575, 282, 4649, 314],
    "code": [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230, 7996, 198],
    "chat": [1, 4093, 198, 1780, 314, 260, 31469, 6740, 281, 260, 905, 47, 2, 198, 1, 520, 9531, 198],
}


@pytest.fixture(scope="module")
def runner(default_model_path) -> ModelRunner:
    config = WorkerConfig(model=str(default_model_path), device="cpu", kv_cache_gb=0.05, block_size=BLOCK_SIZE)
    return ModelRunner(config, default_model_path, DeviceInfo.resolve(config), SchedulerConfig().step_limits())


@torch.inference_mode()
def reference_greedy(runner: ModelRunner, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt``, each token from a full prefill into a fresh cache."""
    model, config = runner.model, runner.model_config
    tokens = list(prompt)
    for _ in range(num_tokens):
        n = len(tokens)
        num_blocks = -(-n // BLOCK_SIZE)
        caches = allocate_kv_caches(config, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([n], dtype=torch.int32),
            block_tables=torch.arange(num_blocks, dtype=torch.int32).unsqueeze(0),
            slot_mapping=torch.arange(n),
            max_query_len=n,
            max_seq_len=n,
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[n],
        )
        hidden = model(torch.tensor(tokens), torch.arange(n), caches, meta)
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return tokens[len(prompt) :]


class PlanMaker:
    """A minimal scheduler: scattered block ids, plans written step by step by the test."""

    def __init__(self, runner: ModelRunner, seed: int) -> None:
        runner.reset()
        self.free = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.step_id = 0
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}

    def _grow(self, rid: str, end: int) -> list[int]:
        table = self.blocks[rid]
        new = []
        while len(table) * BLOCK_SIZE < end:
            new.append(self.free.pop())
            table.append(new[-1])
        return new

    def plan(
        self,
        schedule: dict[str, int],
        *,
        new: dict[str, list[int]] | None = None,
        shared: dict[str, tuple[list[int], int]] | None = None,
        copies: list[tuple[int, int]] | None = None,
        finished: list[str] | None = None,
    ) -> BatchPlan:
        """``schedule``: new tokens per request. ``new``: requests sent in full with these
        tokens, nothing computed; ``shared``: requests sent in full whose first blocks
        and computed tokens are given (a prefix-cache hit)."""
        new_requests, cached_requests = [], []
        for rid, tokens in (new or {}).items():
            self.tokens[rid], self.computed[rid], self.blocks[rid] = list(tokens), 0, []
            self.outputs.setdefault(rid, [])
        for rid, (blocks, computed) in (shared or {}).items():
            self.blocks[rid], self.computed[rid] = list(blocks), computed
        for rid, num_new in schedule.items():
            fresh = self._grow(rid, self.computed[rid] + num_new)
            if rid in (new or {}) or rid in (shared or {}):
                new_requests.append(
                    NewRequestData(rid, self.tokens[rid], GREEDY, list(self.blocks[rid]), self.computed[rid])
                )
            else:
                cached_requests.append(CachedRequestData(rid, fresh, self.computed[rid]))
        self.step_id += 1
        return BatchPlan(
            step_id=self.step_id,
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=dict(schedule),
            finished_request_ids=finished or [],
            block_copies=copies or [],
        )

    def run(self, runner: ModelRunner, plan: BatchPlan) -> None:
        result = runner.execute(plan)
        for rid, num_new in plan.num_scheduled_tokens.items():
            self.computed[rid] += num_new
        for rid, tokens in zip(result.request_ids, result.sampled_token_ids, strict=True):
            self.tokens[rid].extend(tokens)
            self.outputs[rid].extend(tokens)

    def decode(self, runner: ModelRunner, rids: list[str], steps: int) -> None:
        for _ in range(steps):
            self.run(runner, self.plan({rid: 1 for rid in rids}))


def test_step_result_splits_its_time(runner: ModelRunner) -> None:
    """On the CPU the forward pass runs as it is queued: all of a step is host work, and no
    copy from a device is waited for. Nor is any CUDA graph replayed (the worker reports 0)."""
    assert runner.graphs is None and runner.graph_max_seqs == 0
    pm = PlanMaker(runner, seed=2)
    plan = pm.plan({"france": 5}, new={"france": PROMPTS["france"]})
    result = runner.execute(plan)
    assert result.wait_ms == 0.0
    assert 0.0 < result.host_ms <= result.forward_ms
    assert result.host_ms > 0.9 * result.forward_ms
    runner.execute(pm.plan({}, finished=["france"]))


def test_chunked_prefill_mixed_with_decodes(runner: ModelRunner) -> None:
    pm = PlanMaker(runner, seed=1)
    # "code" is prefilled in three chunks while "france" already decodes.
    pm.run(runner, pm.plan({"france": 5, "code": 7}, new={"france": PROMPTS["france"], "code": PROMPTS["code"]}))
    pm.run(runner, pm.plan({"france": 1, "code": 6}))
    pm.run(runner, pm.plan({"france": 1, "code": 5}))
    assert len(pm.outputs["code"]) == 1 and len(pm.outputs["france"]) == 3
    # "chat" joins in one piece while both decode.
    pm.run(runner, pm.plan({"france": 1, "code": 1, "chat": 18}, new={"chat": PROMPTS["chat"]}))
    pm.decode(runner, ["france", "code", "chat"], 6)
    for rid in ("france", "code", "chat"):
        got = pm.outputs[rid]
        assert got == reference_greedy(runner, PROMPTS[rid], len(got)), rid


def test_prefix_shared_through_a_block_copy(runner: ModelRunner) -> None:
    """A second request reuses the first one's full blocks and a copy of its partial
    last block (copy-on-write), then only computes its own tail."""
    pm = PlanMaker(runner, seed=2)
    prompt = PROMPTS["code"][:10]  # blocks of 4: two full, the third holds 2 tokens
    pm.run(runner, pm.plan({"first": 10}, new={"first": prompt}))
    full, partial = pm.blocks["first"][:2], pm.blocks["first"][2]
    copy_dst = pm.free.pop()
    second_prompt = [*prompt, 2, 3590, 314]
    pm.tokens["second"], pm.outputs["second"] = list(second_prompt), []
    # The copy runs before the forward pass, so "first" may write its next token
    # into the source block in the same step.
    pm.run(
        runner,
        pm.plan(
            {"first": 1, "second": 3},
            shared={"second": ([*full, copy_dst], 10)},
            copies=[(partial, copy_dst)],
        ),
    )
    pm.decode(runner, ["first", "second"], 5)
    assert pm.outputs["first"] == reference_greedy(runner, prompt, len(pm.outputs["first"]))
    assert pm.outputs["second"] == reference_greedy(runner, second_prompt, len(pm.outputs["second"]))


def test_preempted_request_resumes_and_finished_state_is_dropped(runner: ModelRunner) -> None:
    pm = PlanMaker(runner, seed=3)
    pm.run(runner, pm.plan({"a": 18, "b": 5}, new={"a": PROMPTS["chat"], "b": PROMPTS["france"]}))
    pm.decode(runner, ["a", "b"], 3)
    # "a" is preempted (its blocks freed) and later sent again in full: prompt and
    # outputs so far, recomputed in two chunks into other blocks.
    pm.free.extend(pm.blocks["a"])
    pm.decode(runner, ["b"], 2)
    pm.run(runner, pm.plan({"a": 10, "b": 1}, new={"a": pm.tokens["a"]}))
    pm.run(runner, pm.plan({"a": len(pm.tokens["a"]) - 10, "b": 1}))
    pm.decode(runner, ["a", "b"], 3)
    assert pm.outputs["a"] == reference_greedy(runner, PROMPTS["chat"], len(pm.outputs["a"]))
    assert pm.outputs["b"] == reference_greedy(runner, PROMPTS["france"], len(pm.outputs["b"]))
    pm.run(runner, pm.plan({"a": 1}, finished=["b"]))
    assert "b" not in runner.states and "a" in runner.states


def test_single_token_sequences_lead_the_batch(runner: ModelRunner) -> None:
    pm = PlanMaker(runner, seed=4)
    pm.run(runner, pm.plan({"a": 5}, new={"a": PROMPTS["france"]}))
    plan = pm.plan({"b": 7, "a": 1, "c": 4}, new={"b": PROMPTS["code"], "c": PROMPTS["chat"]})
    start = runner._apply_plan(plan)
    batch = runner.host_batch(plan, start)
    assert batch.query_start_loc.tolist() == [0, 1, 8, 12]
    assert batch.seq_lens.tolist() == [6, 7, 4]
    assert batch.token_data[0].tolist() == [pm.tokens["a"][5], *PROMPTS["code"][:7], *PROMPTS["chat"][:4]]
    assert batch.sample_ids == ["a"] and batch.sample_rows.tolist() == [0]


def run_engine(runner: ModelRunner, async_scheduling: bool) -> dict[str, tuple[list[int], list, str | None]]:
    """The requests below through a ``LocalEngine`` over ``runner`` with 20 KV blocks (so that
    some are preempted): each output's tokens, logprobs and finish reason."""
    config = SchedulerConfig(async_scheduling=async_scheduling, max_num_seqs=4, max_num_batched_tokens=24)
    engine = LocalEngine.over(runner, config)
    engine.scheduler = Scheduler(config, KVCacheManager(20, BLOCK_SIZE), runner.max_model_len)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)
    seeded = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.3,
                            frequency_penalty=0.5, min_tokens=3, stop_token_ids=[2])
    stop_early = SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=list(range(200, 600)))
    engine.add_request("france", PROMPTS["france"], greedy)
    engine.add_request("code", PROMPTS["code"], seeded)
    engine.scheduler.add_request(Request("chat", PROMPTS["chat"], msgspec.structs.replace(seeded, seed=3), n=2))
    engine.add_request("short", PROMPTS["france"][:2], stop_early)
    engine.add_request("one", PROMPTS["code"][:6], SamplingParams(max_tokens=1, temperature=0.0))
    outputs: dict[str, tuple[list[int], list, str | None]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens, logprobs, _ = outputs.get(out.request_id, ([], [], None))
            outputs[out.request_id] = (tokens + out.new_token_ids, logprobs + (out.logprobs or []),
                                       out.finish_reason)
    assert engine.scheduler.is_idle_and_empty() and engine.scheduler.stats.num_preemptions > 0
    return outputs


def test_async_scheduling_gives_the_same_outputs_as_one_step_at_a_time(
    runner: ModelRunner, late_token_rows: list[int]
) -> None:
    """Greedy with logprobs, seeded sampling with penalties and ``min_tokens``, stop tokens,
    two choices of one prompt, a one-token request, and preemptions: the pipelined engine
    (each step launched before the last one's tokens are read, its decodes taking their
    inputs from the device) gives exactly the outputs of the engine that waits each time."""
    expected = run_engine(runner, async_scheduling=False)
    assert late_token_rows == []
    got = run_engine(runner, async_scheduling=True)
    # Tokens and finish reasons exactly; logprobs up to float noise (batches differ in makeup).
    assert {rid: (tokens, reason) for rid, (tokens, _, reason) in got.items()} == {
        rid: (tokens, reason) for rid, (tokens, _, reason) in expected.items()}
    for rid, (_, logprobs, _) in expected.items():
        assert [lp.top_token_ids for lp in got[rid][1]] == [lp.top_token_ids for lp in logprobs]
        assert [lp.top_logprobs for lp in got[rid][1]] == [pytest.approx(lp.top_logprobs, abs=1e-4) for lp in logprobs]
    assert len(expected["france"][1]) == 12
    assert sum(late_token_rows) > 20  # most decodes took their token from the step before on the device
    assert set(expected) == {"france", "code", "chat#0", "chat#1", "short", "one"}
    assert expected["one"][2] == "length" and expected["short"][2] == "stop"
    assert expected["chat#0"][0] != expected["chat#1"][0]


# The interpreter converts 1-element arrays to ints in a way numpy deprecates.
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
def test_triton_backend_splits_leading_decodes() -> None:
    """A mixed batch led by decodes (the runner's layout): decode kernel for those, prefill
    kernel for the rest, padding rows zero; equal to the torch backend. On the CPU the
    kernels run under the Triton interpreter."""
    from loomserve.worker.attention.triton_backend import TritonAttentionBackend, num_leading_decodes

    assert num_leading_decodes([0, 1, 2, 3, 10, 11]) == 3
    assert num_leading_decodes([0, 1, 2]) == 2
    assert num_leading_decodes([0, 5, 6]) == 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, block_size, num_blocks = 4, 2, 32, 4, 40
    query_lens, prefix_lens = [1, 1, 1, 7, 1, 5], [8, 19, 2, 5, 0, 0]
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for seq_len, prefix in zip(seq_lens, prefix_lens, strict=True):
        table = [perm.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(table + [0] * (6 - len(table)))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(prefix, seq_len)]
    num_padding = 2
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    t = starts[-1] + num_padding

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    meta = AttentionMetadata(
        query_start_loc=tensor(starts, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        slot_mapping=tensor(slots + [-1] * num_padding, torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    cache = torch.randn((2, num_blocks, block_size, kv_heads, head_dim), generator=gen).to(device)
    q, k, v = (torch.randn((t, n, head_dim), generator=gen).to(device) for n in (heads, kv_heads, kv_heads))
    ref_cache = cache.clone()
    ref = TorchAttentionBackend(heads, kv_heads, head_dim, head_dim**-0.5).forward(q, k, v, ref_cache, meta)
    out = TritonAttentionBackend(heads, kv_heads, head_dim, head_dim**-0.5).forward(q, k, v, cache, meta)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert bool((out[t - num_padding :] == 0).all())


def test_fp8_kv_cache_keeps_the_default_models_greedy_text(default_model_path) -> None:
    """``--kv-cache-dtype fp8`` (e4m3 keys and values, through the torch backend here):
    on the default model the first 16 greedy tokens of each prompt are those of the
    float32 cache, their logprobs within 0.06 on average, and the same memory holds four times the blocks
    of a float32 cache."""
    outputs = {}
    for kv_dtype in ("auto", "fp8"):
        config = WorkerConfig(model=str(default_model_path), device="cpu", kv_cache_gb=0.05, block_size=16,
                              kv_cache_dtype=kv_dtype)
        runner = ModelRunner(config, default_model_path, DeviceInfo.resolve(config), SchedulerConfig().step_limits())
        assert all(cache.dtype == runner.kv_dtype for cache in runner.kv_caches)
        engine = LocalEngine.over(runner, SchedulerConfig())
        for rid, prompt in PROMPTS.items():
            engine.add_request(rid, prompt, SamplingParams(max_tokens=16, temperature=0.0, logprobs=0))
        got: dict[str, list[tuple[int, float]]] = {}
        while engine.has_work():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(
                    (token, lp.logprob) for token, lp in zip(out.new_token_ids, out.logprobs or [], strict=True))
        outputs[kv_dtype] = (got, runner.num_blocks)
    (full, full_blocks), (fp8, fp8_blocks) = outputs["auto"], outputs["fp8"]
    assert fp8_blocks // 4 == full_blocks  # float32 on the CPU: 4 bytes per element against 1
    for rid in PROMPTS:
        assert [t for t, _ in fp8[rid]] == [t for t, _ in full[rid]], rid
        drift = [abs(a - b) for (_, a), (_, b) in zip(fp8[rid], full[rid], strict=True)]
        assert sum(drift) / len(drift) < 0.06 and max(drift) < 0.4, drift  # measured: 0.02-0.04, 0.06-0.23


def test_pinned_slots_rotate_and_reuse_their_buffers() -> None:
    slots = PinnedSlots(pin=torch.cuda.is_available())
    taken = [slots.take() for _ in range(2 * PinnedSlots.SLOTS)]
    assert taken == list(range(PinnedSlots.SLOTS)) * 2
    first = slots.buffer(0, torch.int32, 100)
    assert first.numel() == 100 and first.dtype == torch.int32
    # A smaller or equal request reuses the slot's memory; a larger one grows it.
    assert slots.buffer(0, torch.int32, 60).data_ptr() == first.data_ptr()
    grown = slots.buffer(0, torch.int32, 10_000)
    assert grown.numel() == 10_000 and slots.buffer(0, torch.int32, 9_000).data_ptr() == grown.data_ptr()
    # Each dtype and each slot has its own buffer.
    assert slots.buffer(0, torch.int64, 100).data_ptr() != grown.data_ptr()
    assert slots.buffer(1, torch.int32, 100).data_ptr() != grown.data_ptr()
    slots.done(0)
    assert slots.take() == 0  # waits for the copies queued before done(0), if any


def test_batches_in_reused_buffers_carry_nothing_over(runner: ModelRunner) -> None:
    """Every batch's host arrays come out as a fresh zeroed allocation would give them,
    whatever its slot's buffers held before."""
    pm = PlanMaker(runner, seed=5)
    pm.run(runner, pm.plan({"a": 18, "b": 5}, new={"a": PROMPTS["code"], "b": PROMPTS["france"]}))
    for slot in range(PinnedSlots.SLOTS):
        for dtype in (torch.int32, torch.int64):
            runner.staging.buffer(slot, dtype, 100_000).fill_(7)  # leftovers of bigger steps
    plan = pm.plan({"a": 1, "b": 1})
    batch = runner.host_batch(plan, runner._apply_plan(plan))
    tables = [runner.states[rid].block_ids.tolist() for rid in ("a", "b")]
    width = max(len(t) for t in tables)
    assert batch.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
    assert len(tables[0]) > len(tables[1])
    assert batch.query_start_loc.tolist() == [0, 1, 2] and batch.seq_lens.tolist() == [19, 6]
    assert batch.token_data[1].tolist() == [18, 5]
    runner.staging.done(batch.slot)
