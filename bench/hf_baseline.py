"""The Hugging Face transformers baseline on the same workload as ``bench.serving``.

    python -m bench.hf_baseline --model PATH.gguf --workload W.jsonl --concurrency 8 \
        --output-json bench/results/hf-c8.json

It replays the workload in process with ``model.generate`` (greedy, outputs
forced to their planned length), as static batches of ``--concurrency``
requests padded on the left: a batch starts when the previous one has ended,
and every request is queued at time 0, as ``bench.serving`` sends them. Token
times come from a logits processor called once per generated token, so TTFT,
TPOT, ITL and E2EL follow the same definitions and the same aggregation
(``bench.harness.metrics.compute_metrics``) as the served runs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from bench.harness.cli import add_output_json, new_parser
from bench.harness.hf_generate import run_static_batches
from bench.harness.metadata import command_line, utc_timestamp
from bench.harness.metrics import compute_metrics
from bench.harness.results import write_json
from bench.workloads import build_workload
from loomserve.gateway.tokenizer import load_tokenizer

log = logging.getLogger("bench.hf_baseline")


def load(model_path: Path) -> Any:
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("bench.hf_baseline", __doc__, whole_doc=True)
    parser.add_argument("--model", type=Path, required=True, help="GGUF file or Hugging Face directory")
    parser.add_argument("--workload", required=True, help="a .jsonl workload file")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=1, help="static batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    add_output_json(parser, help=None)
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
    outcomes, duration = run_static_batches(model, prompts, [r.output_len for r in workload.requests], args.concurrency,
                             tokenizer.eos_token_id)
    metrics = compute_metrics(outcomes, duration)
    result = {
        "schema": "loomserve.bench.hf_baseline/1",
        "label": args.label,
        "metadata": {"date": utc_timestamp(), "command": command_line("bench.hf_baseline", argv),
                     "torch_threads": torch.get_num_threads()},
        "config": {"model": str(args.model), "workload": args.workload, "concurrency": args.concurrency},
        "metrics": metrics.__dict__ | {k: summary.to_json() for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
                                       if (summary := getattr(metrics, k))},
    }
    print(json.dumps(result["metrics"], indent=2))
    if args.output_json:
        write_json(args.output_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
