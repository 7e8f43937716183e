"""Tensor parallelism on the CPU: real process groups over gloo, one OS process per rank.

* shard arithmetic: heads, replicated KV heads, padded vocabulary, clear errors;
* each rank loads only its slice (safetensors, GGUF and dummy weights) and the
  group's logits equal the single-process model's on tiny Llama models with 8
  query heads and 2 or 4 KV heads, at TP = 2 and 4 (TP = 4 with 2 KV heads
  replicates each KV head on two ranks), with biases on q/k/v and on the
  row-parallel o_proj, tied and untied embeddings, and a vocabulary that does not
  divide evenly;
* a linear method that lays its weight out along other axes (``tests/worker/layers/
  test_linear.py``) loads each rank's slices along them and gives the same logits;
* greedy generation through the engine (scheduler + model runner on every rank,
  rank 0 sampling) gives the same tokens at TP = 1, 2 and 4;
* on two GPUs (marked ``gpu``): the same over NCCL in bf16 with the Triton
  kernels, decode steps replaying CUDA graphs that hold the all-reduces. Summation order
  differs between group sizes (partial sums are all-reduced), so exact token
  equality is the rule and a difference is accepted only at a near-tie of the
  top two logprobs at the first differing token (``tests.e2e.reference``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from loomserve.local_engine import LocalEngine
from loomserve.scheduler.request import Request
from loomserve.shared.config import SchedulerConfig, WorkerConfig
from loomserve.shared.messages import SamplingParams
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.device import DeviceInfo
from loomserve.worker.group import parse_ranks
from loomserve.worker.kv_cache import allocate_kv_caches
from loomserve.worker.layers.ops import default_layer_ops
from loomserve.worker.loader import load_model
from loomserve.worker.loader.build import build_model
from loomserve.worker.loader.safetensors_loader import read_hf_config
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import Shard, TensorParallel, destroy_tensor_parallel, init_tensor_parallel
from tests.e2e.reference import NEAR_TIE_NATS
from tests.stack import free_port
from tests.worker.layers.test_linear import TransposedLinearMethod, fill_transposed
from tests.worker.loader.test_loaders import widen_weights, write_gguf

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# 8 query heads of dim 8; the vocabulary (98) is not a multiple of 4.
BASE: dict[str, Any] = {
    "vocab_size": 98,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
MODELS = {
    "kv2_bias_tied": {**BASE, "num_key_value_heads": 2, "attention_bias": True, "tie_word_embeddings": True},
    "kv4_untied": {**BASE, "num_key_value_heads": 4, "tie_word_embeddings": False},
}
TOKENS = [int(t) for t in torch.randint(0, BASE["vocab_size"], (50,), generator=torch.Generator().manual_seed(0))]
PROMPTS = [TOKENS[:7], TOKENS[10:31], TOKENS[5:6], TOKENS[20:50]]
MAX_TOKENS = 12


def test_shard_arithmetic():
    assert TensorParallel(1, 4).kv_heads(8, 32) == (2, 2)
    # Fewer KV heads than ranks: ranks 0-1 read head 0, ranks 2-3 head 1.
    assert [TensorParallel(r, 4).kv_heads(2, 8) for r in range(4)] == [(1, 0), (1, 0), (1, 1), (1, 1)]
    assert [TensorParallel(r, 3).kv_heads(3, 9) for r in range(3)] == [(1, 0), (1, 1), (1, 2)]
    per_rank, last = TensorParallel(3, 4).vocab_shard(98)
    assert per_rank == 25 and last == Shard(0, 75, 23)
    assert TensorParallel(1, 4).even_shard(128, "features", dim=1) == Shard(1, 32, 32)
    with pytest.raises(ValueError, match=r"num_heads \(9\) is not divisible by the tensor-parallel size 2"):
        TensorParallel(0, 2).kv_heads(3, 9)
    with pytest.raises(ValueError, match="neither a divisor nor a multiple of num_kv_heads"):
        TensorParallel(0, 4).kv_heads(3, 12)


def test_parse_ranks():
    assert parse_ranks(None, 4) == [0, 1, 2, 3]
    assert parse_ranks("2-3", 4) == [2, 3]
    assert parse_ranks("4,5, 7", 8) == [4, 5, 7]
    for bad in ("1-4", "0,0", "x", "-1"):
        with pytest.raises(ValueError, match="--ranks"):
            parse_ranks(bad, 4)


def _hf_model(name: str) -> Any:
    config = transformers.LlamaConfig(**MODELS[name])
    torch.manual_seed(0)
    return widen_weights(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


@torch.inference_mode()
def _logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Prefill ``tokens`` in two chunks through a scattered paged cache of this rank's KV heads."""
    block_size = 4
    weight = model.embed_tokens.weight
    dev = weight.device
    caches = allocate_kv_caches(model.config, 32, block_size, weight.dtype, dev, model.num_kv_heads)
    table = list(range(31, 31 - len(tokens) // block_size - 1, -1))
    out = []
    for begin, end in ((0, 19), (19, len(tokens))):
        n = end - begin
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=dev),
            block_tables=torch.tensor([table], dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor([table[p // block_size] * block_size + p % block_size
                                       for p in range(begin, end)], device=dev),
            max_query_len=n,
            max_seq_len=end,
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[end],
        )
        hidden = model(torch.tensor(tokens[begin:end], device=dev), torch.arange(begin, end, device=dev), caches, meta)
        out.append(model.compute_logits(hidden).cpu())
    return torch.cat(out)


def _generate(model_path: Path, tp: TensorParallel, device: torch.device) -> dict[str, Any]:
    """Greedy tokens of PROMPTS (all in one engine, so they batch) and the top-2 logprobs of each step."""
    worker = WorkerConfig(device=str(device), kv_cache_gb=0.01, gpu_memory_utilization=0.3)
    engine = LocalEngine(SchedulerConfig(), worker, model_path, tp=tp)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2)
    for i, prompt in enumerate(PROMPTS):
        engine.scheduler.add_request(Request(str(i), list(prompt), sampling, arrival_time=float(i)))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    tops: dict[str, list[list[float]]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.scheduler.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            for lp in out.logprobs or []:
                tops[out.request_id].append(list(lp.top_logprobs))
    return {"tokens": tokens, "tops": tops}


def _run_rank(rank: int, size: int, address: str, workdir: str, device_type: str = "cpu") -> None:
    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DeviceInfo.resolve(WorkerConfig(device=str(device)))
    tp = init_tensor_parallel(rank, size, address, device)
    work = Path(workdir)
    results: dict[str, Any] = {}
    for name in MODELS:
        for fmt, path in (("safetensors", work / name), ("gguf", work / f"{name}.gguf")):
            model, _ = load_model(path, tp=tp, device=device, dtype=info.dtype, attn_backend=info.attention_backend())
            results[f"{name}/{fmt}"] = _logits(model, TOKENS)
            if fmt == "safetensors":
                # Only the rank's slice is held: e.g. its query heads of layer 0.
                qkv = model.get_parameter("layers.0.self_attn.qkv_proj.weight")
                heads = BASE["num_attention_heads"] // size + 2 * model.num_kv_heads
                assert qkv.shape == (heads * 8, BASE["hidden_size"]), qkv.shape
        dummy, _ = load_model(work / name, load_format="dummy", seed=5, tp=tp, device=device, dtype=info.dtype,
                              attn_backend=info.attention_backend())
        results[f"{name}/dummy"] = _logits(dummy, TOKENS)
        if not MODELS[name]["tie_word_embeddings"]:  # a tied head shares the embedding's (vocab, hidden) layout
            # A linear method of other weight axes: each rank cuts the checkpoint along them.
            ops = dataclasses.replace(default_layer_ops(device), linear=TransposedLinearMethod)
            toy = build_model(read_hf_config(work / name), info.attention_backend(), dtype=info.dtype, device=device,
                              ops=ops, tp=tp)
            fill_transposed(toy, load_file(work / name / "model.safetensors"))
            results[f"{name}/transposed-method"] = _logits(toy, TOKENS)
    results["generate"] = _generate(work / "kv2_bias_tied", tp, device)
    if rank == 0:
        torch.save(results, work / f"tp{size}-{device_type}.pt")
    destroy_tensor_parallel(tp)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tp")
    for name in MODELS:
        ref = _hf_model(name)
        ref.save_pretrained(work / name, safe_serialization=True)
        write_gguf(ref, work / f"{name}.gguf")
        (work / name / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return work


@pytest.fixture(scope="module")
def single(workdir: Path) -> dict[str, Any]:
    """The same computations in this process, without a group."""
    _run_rank(0, 1, "", str(workdir))
    results: dict[str, Any] = torch.load(workdir / "tp1-cpu.pt")
    return results


def _run_group(size: int, workdir: Path, device_type: str = "cpu") -> dict[str, Any]:
    mp.start_processes(_run_rank, args=(size, f"127.0.0.1:{free_port()}", str(workdir), device_type), nprocs=size,
                       start_method="spawn")
    results: dict[str, Any] = torch.load(workdir / f"tp{size}-{device_type}.pt")
    return results


def _assert_same_greedy(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    for rid, want in ref["tokens"].items():
        got = ours["tokens"][rid]
        assert len(got) == len(want) == MAX_TOKENS
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            if a != b:
                top = ref["tops"][rid][step]
                gap = top[0] - top[1]
                assert gap <= NEAR_TIE_NATS, f"request {rid} differs at step {step} (top-2 gap {gap:.4f})"
                break


def _assert_same_logits(group: dict[str, Any], single: dict[str, Any], rel: float) -> None:
    for key, want in single.items():
        if key == "generate":
            continue
        diff = (group[key].float() - want.float()).abs().max().item()
        assert diff < rel * max(1.0, want.abs().max().item()), f"{key}: max abs logit difference {diff:.2e}"


def test_a_linear_method_with_other_weight_axes_gives_the_same_logits(single: dict[str, Any]) -> None:
    _assert_same_logits({"toy": single["kv4_untied/transposed-method"]}, {"toy": single["kv4_untied/safetensors"]},
                        1e-5)


@pytest.mark.parametrize("size", [2, 4])
def test_group_matches_single_process(size: int, workdir: Path, single: dict[str, Any]) -> None:
    group = _run_group(size, workdir)
    _assert_same_logits(group, single, 1e-4)
    _assert_same_greedy(group["generate"], single["generate"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_group_with_cuda_graphs_matches_one_gpu(workdir: Path) -> None:
    one = _run_group(1, workdir, "cuda")
    two = _run_group(2, workdir, "cuda")
    _assert_same_logits(two, one, 2e-2)  # bf16
    _assert_same_greedy(two["generate"], one["generate"])
