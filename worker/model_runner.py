"""Turns a ``BatchPlan`` into one forward pass and sampled tokens.

The runner keeps, per request, what the plan sent once (tokens, sampling
parameters, block table) and extends it with the diffs of later plans and with
the tokens it samples itself. For each step it lays the scheduled tokens of all
requests out on one flattened token axis (see ``worker.attention.base``),
runs the model, and samples one token for every request whose known tokens are
all computed after this step (a finished prefill, or a decode).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.config import WorkerConfig
from shared.messages import BatchPlan, StepResult
from worker.attention.base import AttentionMetadata
from worker.device import DeviceInfo
from worker.loader import load_model
from worker.models.llama import allocate_kv_caches, kv_cache_bytes_per_block
from worker.sampler import SamplingState, sample

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    token_ids: list[int]
    block_ids: list[int]
    sampling: SamplingState


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) index into T of each sampled request's last token
    sample_ids: list[str]


class ModelRunner:
    def __init__(self, config: WorkerConfig, model_path: Path | str, device: DeviceInfo) -> None:
        self.config = config
        self.device = device.device
        self.dtype = device.dtype
        started = time.monotonic()
        self.model, self.model_config = load_model(
            model_path, load_format=config.load_format, dtype=self.dtype, device=self.device, seed=config.seed
        )
        log.info("model loaded in %.1f s", time.monotonic() - started)
        self.model.eval()
        self.block_size = config.block_size
        model_len = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_len, model_len)
        bytes_per_block = kv_cache_bytes_per_block(self.model_config, self.block_size, self.dtype)
        self.num_blocks = device.kv_cache_bytes(config) // bytes_per_block
        if self.num_blocks < 2:
            raise RuntimeError(
                f"no room for the KV cache: {bytes_per_block} bytes per block, "
                f"{device.kv_cache_bytes(config)} bytes available; raise --kv-cache-gb or "
                f"--gpu-memory-utilization"
            )
        self.kv_caches = allocate_kv_caches(
            self.model_config, self.num_blocks, self.block_size, self.dtype, self.device
        )
        self.states: dict[str, RequestState] = {}
        self._unseeded = torch.Generator(device=self.device).manual_seed(config.seed)

    def reset(self) -> None:
        self.states.clear()

    # -- one step ------------------------------------------------------------

    def _apply_plan(self, plan: BatchPlan) -> dict[str, int]:
        """Update per-request state from the plan; return each request's start position."""
        for request_id in plan.finished_request_ids:
            self.states.pop(request_id, None)
        start: dict[str, int] = {}
        for new in plan.new_requests:
            state = self.states.get(new.request_id)
            if state is None:
                sampling = SamplingState(new.sampling, new.token_ids, device=self.device)
                self.states[new.request_id] = RequestState(list(new.token_ids), list(new.block_ids), sampling)
            else:
                # Resumed after preemption: the sampling state (penalty counts, a
                # seeded generator) carries on; tokens and blocks are replaced.
                state.token_ids = list(new.token_ids)
                state.block_ids = list(new.block_ids)
            start[new.request_id] = new.num_computed_tokens
        for cached in plan.cached_requests:
            self.states[cached.request_id].block_ids.extend(cached.new_block_ids)
            start[cached.request_id] = cached.num_computed_tokens
        return start

    def prepare_inputs(self, plan: BatchPlan, start: dict[str, int]) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        for request_id, num_new in plan.num_scheduled_tokens.items():
            state = self.states[request_id]
            begin = start[request_id]
            end = begin + num_new
            input_ids.extend(state.token_ids[begin:end])
            positions.extend(range(begin, end))
            table = state.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(end)
            tables.append(table)
            if end == len(state.token_ids):
                sample_rows.append(query_start_loc[-1] - 1)
                sample_ids.append(request_id)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=max(plan.num_scheduled_tokens.values()),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=dev),
            sample_ids=sample_ids,
        )

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], dtype=torch.int64, device=self.device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.int64, device=self.device)
        for cache in self.kv_caches:  # (2, num_blocks, block_size, kv_heads, head_dim)
            cache[:, dst] = cache[:, src]

    @torch.inference_mode()
    def execute(self, plan: BatchPlan) -> StepResult:
        started = time.perf_counter()
        start = self._apply_plan(plan)
        self._copy_blocks(plan.block_copies)
        inputs = self.prepare_inputs(plan, start)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        sampled_ids: list[list[int]] = []
        logprobs = []
        if inputs.sample_ids:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])  # (S, vocab)
            states = [self.states[rid].sampling for rid in inputs.sample_ids]
            out = sample(logits, states, self._unseeded)
            for rid, token_id, state in zip(inputs.sample_ids, out.token_ids, states, strict=True):
                self.states[rid].token_ids.append(token_id)
                state.append_output(token_id)
                sampled_ids.append([token_id])
            logprobs = [None if lp is None else [lp] for lp in out.logprobs]
        return StepResult(
            step_id=plan.step_id,
            request_ids=inputs.sample_ids,
            sampled_token_ids=sampled_ids,
            logprobs=logprobs if any(lp is not None for lp in logprobs) else [],
            forward_ms=(time.perf_counter() - started) * 1000.0,
        )
