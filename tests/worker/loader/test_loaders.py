"""The loaders against Hugging Face transformers on tiny random models.

* safetensors: ``save_pretrained`` of tiny Llama / Qwen2 / Mistral models (llama3 rope
  scaling, q/k/v biases, untied embeddings, several shards) loads through ours and
  gives the same logits;
* GGUF: the same tiny models written as GGUF files the way llama.cpp's converter
  lays them out (q/k rows permuted for ``llama``, quantised tensors, ``rope_freqs``
  for Llama 3 scaling, no ``output.weight`` when tied);
* dummy: the named shapes, checked on the meta device, and a tiny real forward;
* errors: clear ``ValueError``s.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
import torch

from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.kv_cache import allocate_kv_caches
from loomserve.worker.loader import DUMMY_SHAPES, load_model
from loomserve.worker.loader.dummy import dummy_config
from loomserve.worker.loader.gguf_loader import tensor_to_torch, unpermute_rope_rows
from loomserve.worker.model_config import ModelConfig, llama3_freq_factors
from loomserve.worker.models.llama import LlamaForCausalLM

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TINY: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,  # GGUF block quants need rows that are multiples of 32
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Meta's constants, the only Llama 3 scaling GGUF files can express (as rope_freqs).
LLAMA3_META_ROPE = {**LLAMA3_ROPE, "rope_theta": 500000.0, "original_max_position_embeddings": 8192}
TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, TINY["vocab_size"], 90)]


def tiny_hf_model(kind: str, seed: int = 0):
    """A tiny random HF model with ``widen_weights``."""
    if kind == "llama3":
        config = transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE)
    elif kind == "llama3_meta":
        config = transformers.LlamaConfig(
            **{**TINY, "max_position_embeddings": 16384}, rope_parameters=LLAMA3_META_ROPE
        )
    elif kind == "llama_bias_tied":
        config = transformers.LlamaConfig(**TINY, attention_bias=True, tie_word_embeddings=True)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**TINY, tie_word_embeddings=True)
    elif kind == "mistral":
        config = transformers.MistralConfig(**TINY, sliding_window=None)
    else:
        raise AssertionError(kind)
    torch.manual_seed(seed)
    return widen_weights(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


@torch.no_grad()
def widen_weights(model: Any) -> Any:
    """Redraw a random HF model's weights wider than HF's init (norms near 1, the rest
    N(0, 0.15)), so that its logits are not all ~0; in eval mode."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1 + 0.1 * torch.randn_like(param))
        else:
            param.normal_(0.0, 0.15)
    return model.eval()


@torch.inference_mode()
def hf_logits(model, tokens):
    return model(torch.tensor([tokens])).logits[0]


@torch.inference_mode()
def our_logits(model: LlamaForCausalLM, config: ModelConfig, tokens, chunks=(37,)):
    """Prefill ``tokens`` in chunks, split at ``chunks``, through a scattered paged cache."""
    block_size = 4
    caches = allocate_kv_caches(config, 64, block_size, model.embed_tokens.weight.dtype, "cpu")
    table = list(range(63, 63 - (len(tokens) + 3) // block_size - 1, -1))
    bounds = [0, *chunks, len(tokens)]
    out = []
    for begin, end in itertools.pairwise(bounds):
        n = end - begin
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=torch.tensor([table], dtype=torch.int32),
            slot_mapping=torch.tensor(
                [table[p // block_size] * block_size + p % block_size for p in range(begin, end)]
            ),
            max_query_len=n,
            max_seq_len=end,
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[end],
        )
        hidden = model(torch.tensor(tokens[begin:end]), torch.arange(begin, end), caches, meta)
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


def assert_same_logits(ours, ref):
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4 * max(1.0, ref.abs().max().item()), f"max abs logit difference {diff:.2e}"


# -- safetensors ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama3", "llama_bias_tied", "qwen2", "mistral"])
def test_safetensors_matches_hf(kind, tmp_path):
    ref = tiny_hf_model(kind)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model, config = load_model(tmp_path)
    assert config.architecture == ref.config.model_type
    assert config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert_same_logits(our_logits(model, config, TOKENS), hf_logits(ref, TOKENS))


def test_safetensors_sharded(tmp_path):
    ref = tiny_hf_model("mistral", seed=1)
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, config = load_model(tmp_path, load_format="safetensors")
    assert_same_logits(our_logits(model, config, TOKENS), hf_logits(ref, TOKENS))


def test_safetensors_llama3_rope_config(tmp_path):
    tiny_hf_model("llama3").save_pretrained(tmp_path, safe_serialization=True)
    _, config = load_model(tmp_path)
    assert config.rope_scaling == {**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    assert config.rope_theta == 10000.0 and not config.tie_word_embeddings


def test_transformers_4_config_layout():
    """Older config.json files keep rope_theta and rope_scaling at the top level."""
    hf = {
        **TINY,
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "eos_token_id": [5, 6],
    }
    config = ModelConfig.from_hf_config(hf, generation_config={"eos_token_id": [6, 7]})
    assert config.rope_theta == 500000.0 and config.rope_scaling is not None
    assert config.rope_scaling["factor"] == 8.0
    assert config.eos_token_ids == (5, 6, 7)
    assert config.head_dim == 16


def test_missing_weight_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_model("mistral").save_pretrained(tmp_path, safe_serialization=True)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


# -- GGUF ------------------------------------------------------------------------------

_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_row_order(rows: int, num_heads: int) -> np.ndarray:
    """llama.cpp's converter row permutation for q/k: file row r holds HF row order[r]."""
    order = np.arange(rows)
    return order.reshape(num_heads, 2, rows // num_heads // 2).swapaxes(1, 2).reshape(rows)


def write_gguf(ref, path, qtype=gguf.GGMLQuantizationType.F32):
    """Write ``ref`` as llama.cpp would and set ``ref``'s weights to what the file holds.

    2-D weights are stored as ``qtype`` (quantised row by row, so permuting quantised
    rows is permuting the weight's rows); the reference gets the dequantised values.
    """
    cfg = ref.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if cfg.rope_parameters["rope_type"] == "llama3":
        factors = llama3_freq_factors(cfg.rope_parameters, head_dim, cfg.rope_parameters["rope_theta"])
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if name == "model.embed_tokens.weight":
                gguf_name = "token_embd.weight"
            elif name == "model.norm.weight":
                gguf_name = "output_norm.weight"
            elif name == "lm_head.weight":
                gguf_name = "output.weight"
            else:
                _, _, layer, rest = name.split(".", 3)
                module, kind = rest.rsplit(".", 1)
                gguf_name = f"blk.{layer}.{_GGUF_BLOCK[module]}.{kind}"
            data = param.numpy().astype(np.float32)
            raw_dtype = None
            if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
                data = gguf.quants.quantize(data, qtype)
                raw_dtype = qtype
                param.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype)))
            if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
                heads = cfg.num_attention_heads if ".attn_q." in gguf_name else cfg.num_key_value_heads
                data = data[llama_cpp_row_order(data.shape[0], heads)]
            writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["llama3_meta", "llama_bias_tied", "qwen2", "mistral"])
def test_gguf_matches_hf(kind, tmp_path):
    ref = tiny_hf_model(kind, seed=2)
    path = tmp_path / "tiny.gguf"
    write_gguf(ref, path)
    model, config = load_model(path)
    assert config.tie_word_embeddings == ref.config.tie_word_embeddings
    if kind == "llama3_meta":
        assert config.rope_scaling == {k: v for k, v in LLAMA3_META_ROPE.items() if k != "rope_theta"}
    assert_same_logits(our_logits(model, config, TOKENS), hf_logits(ref, TOKENS))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16"])
def test_gguf_quantised_matches_hf(qtype, tmp_path):
    ref = tiny_hf_model("llama3_meta", seed=3)
    path = tmp_path / "tiny.gguf"
    write_gguf(ref, path, gguf.GGMLQuantizationType[qtype])
    model, config = load_model(path, load_format="gguf")
    assert_same_logits(our_logits(model, config, TOKENS), hf_logits(ref, TOKENS))


def test_unpermute_inverts_llama_cpp_order():
    w = torch.arange(48.0).reshape(12, 4)  # 3 heads of 4 rows
    stored = w[llama_cpp_row_order(12, 3)]
    assert torch.equal(unpermute_rope_rows(stored, 3), w)


def test_gguf_unsupported_quant_type(tmp_path):
    path = tmp_path / "ints.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(path).tensors[0]
    with pytest.raises(ValueError, match=r"unsupported type I32; supported: .*Q4_K"):
        tensor_to_torch(tensor)


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'.*qwen2"):
        load_model(path)


def test_llama3_factors_round_trip():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = llama3_freq_factors(scaling, 128, 500000.0)
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.embedding_length": 4096,
        "llama.feed_forward_length": 14336,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.rope.freq_base": 500000.0,
        "llama.vocab_size": 128256,
    }
    config = ModelConfig.from_gguf_metadata(metadata, has_output_weight=True, rope_freq_factors=factors)
    assert config.rope_scaling == {"rope_type": "llama3", **scaling}
    with pytest.raises(ValueError, match="do not match Llama 3 rope scaling"):
        ModelConfig.from_gguf_metadata(metadata, has_output_weight=True, rope_freq_factors=[1.0] * 32 + [3.0] * 32)


# -- dummy -----------------------------------------------------------------------------

# Published parameter counts (embedding counted once where tied).
PARAMETER_COUNTS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "llama-tiny": 8_651_392,
}


@pytest.mark.parametrize("name", sorted(DUMMY_SHAPES))
def test_dummy_shapes_on_meta(name):
    model, config = load_model(name, load_format="dummy", dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]
    assert model.embed_tokens.weight.device.type == "meta"
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    if name.startswith("llama-3"):
        assert config.vocab_size == 128256 and config.rope_theta == 500000.0
        assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
        assert config.max_position_embeddings == 131072 and config.num_kv_heads == 8
    qkv = model.get_parameter("layers.0.self_attn.qkv_proj.weight")
    assert qkv.shape == (config.q_size + 2 * config.kv_size, config.hidden_size)
    gate_up = model.get_parameter("layers.0.mlp.gate_up_proj.weight")
    assert gate_up.shape == (2 * config.intermediate_size, config.hidden_size)


def test_dummy_8b_config():
    config = dummy_config("llama-3.1-8b")
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (32, 4096, 14336)
    assert (config.num_heads, config.head_dim, config.tie_word_embeddings) == (32, 128, False)
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dummy_tiny_forward(tmp_path, dtype):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama", "rope_parameters": LLAMA3_ROPE}))
    model, config = load_model(tmp_path, load_format="dummy", dtype=dtype, seed=1)
    again, _ = load_model(tmp_path, load_format="dummy", dtype=dtype, seed=1)
    down = "layers.1.mlp.down_proj.weight"
    assert torch.equal(model.get_parameter(down), again.get_parameter(down))
    assert model.get_parameter(down).dtype == dtype
    assert torch.all(model.norm.weight == 1)
    logits = our_logits(model, config, TOKENS)
    assert logits.shape == (len(TOKENS), TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_dummy_real_shape_forward_bf16():
    model, config = load_model("smollm2-135m", load_format="dummy", dtype=torch.bfloat16)
    logits = our_logits(model, config, TOKENS[:20], chunks=(12,))
    assert torch.isfinite(logits).all() and logits.abs().max() > 0


# -- errors ------------------------------------------------------------------------------


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="unknown load_format 'onnx'"):
        load_model(tmp_path, load_format="onnx")
    with pytest.raises(ValueError, match="no shape for dummy model 'llama-9'"):
        load_model("llama-9", load_format="dummy")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama, qwen2, mistral"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not the requested gguf"):
        load_model(tmp_path, load_format="gguf")
