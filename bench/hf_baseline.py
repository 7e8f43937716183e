"""The Hugging Face transformers baseline on the same workload as ``bench.serving``.

    python -m bench.hf_baseline --model PATH.gguf --workload W.jsonl --concurrency 8 \
        --output-json bench/results/hf-c8.json

It replays the workload in process with ``model.generate`` (greedy, outputs
forced to their planned length), as static batches of ``--concurrency``
requests padded on the left: a batch starts when the previous one has ended,
and every request is queued at time 0, as ``bench.serving`` sends them. Token
times come from a logits processor called once per generated token, so TTFT,
TPOT, ITL and E2EL follow the same definitions and the same aggregation
(``bench.serving.compute_metrics``) as the served runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from bench.serving import RequestOutcome, compute_metrics
from bench.workloads import build_workload
from loomserve.gateway.tokenizer import load_tokenizer

log = logging.getLogger("bench.hf_baseline")


class StepClock(LogitsProcessor):
    """Records the time at which each generation step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def load(model_path: Path) -> Any:
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def run(model: Any, prompts: list[list[int]], output_lens: list[int], batch_size: int,
        pad_id: int, *, device: torch.device | str = "cpu",
        deadline: float | None = None) -> tuple[list[RequestOutcome], float]:
    """Every request in static batches, in order; with a ``deadline`` (``time.perf_counter``),
    no batch starts after it, and only the requests of the batches run are returned."""
    outcomes: list[RequestOutcome] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        if deadline is not None and time.perf_counter() > deadline:
            log.warning("deadline reached: %d of %d requests run", first, len(prompts))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="GGUF file or Hugging Face directory")
    parser.add_argument("--workload", required=True, help="a .jsonl workload file")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=1, help="static batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--output-json", type=Path, default=None)
    parser.add_argument("--label", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    workload = build_workload(args.workload, args.num_requests, tokenizer=tokenizer)
    prompts = [r.prompt if isinstance(r.prompt, list) else tokenizer.encode(r.prompt) for r in workload.requests]
    model = load(args.model)
    log.info("running %d requests in static batches of %d", len(prompts), args.concurrency)
    outcomes, duration = run(model, prompts, [r.output_len for r in workload.requests], args.concurrency,
                             tokenizer.eos_token_id)
    metrics = compute_metrics(outcomes, duration)
    result = {
        "schema": "loomserve.bench.hf_baseline/1",
        "label": args.label,
        "metadata": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
                     "torch_threads": torch.get_num_threads()},
        "config": {"model": str(args.model), "workload": args.workload, "concurrency": args.concurrency},
        "metrics": metrics.__dict__ | {k: getattr(metrics, k).__dict__ for k in ("ttft_ms", "tpot_ms", "itl_ms",
                                                                               "e2el_ms") if getattr(metrics, k)},
    }
    print(json.dumps(result["metrics"], indent=2))
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
