"""Hugging Face transformers ``generate`` in static batches, each generated token timed: the
baseline system, measured with ``bench.serving``'s outcomes and metric definitions."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.serving import RequestOutcome

logger = logging.getLogger(__name__)


class StepClock(LogitsProcessor):
    """Records the time at which each generation step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def run_static_batches(model: Any, prompts: list[list[int]], output_lens: list[int], batch_size: int,
                       pad_id: int, *, device: torch.device | str = "cpu",
                       deadline: float | None = None) -> tuple[list[RequestOutcome], float]:
    """Every request in static batches of ``batch_size``, left-padded, in order, all queued at
    time 0; with a ``deadline`` (``time.perf_counter``), no batch starts after it, and only the
    requests of the batches run are returned. Returns the outcomes and the run's duration."""
    outcomes: list[RequestOutcome] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        if deadline is not None and time.perf_counter() > deadline:
            logger.warning("deadline reached: %d of %d requests run", first, len(prompts))
            break
        batch = prompts[first:first + batch_size]
        lens = output_lens[first:first + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        clock = StepClock()
        # A static batch runs until its longest member is done (the point of the baseline).
        model.generate(ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                       do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=pad_id)
        for prompt, n in zip(batch, lens, strict=True):
            times = clock.times[:n]
            outcomes.append(RequestOutcome(
                prompt_len=len(prompt), planned_output_len=n, output_tokens=len(times),
                ttft_s=times[0] - started, e2el_s=times[-1] - started,
                itls_s=[b - a for a, b in itertools.pairwise(times)],
            ))
    return outcomes, time.perf_counter() - started
