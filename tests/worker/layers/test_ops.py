"""The GPU layer ops (``TRITON_OPS``: fused Triton kernels, the one-row matmul kernel)
against the torch ops, on one model's weights, in fp32. On a GPU both run there; without
one the kernels run under the Triton interpreter (chosen in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest
import torch

from loomserve.kernels.gemv import linear as gemv_linear
from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.attention.torch_backend import TorchAttentionBackend
from loomserve.worker.attention.triton_backend import TritonAttentionBackend
from loomserve.worker.kv_cache import allocate_kv_caches
from loomserve.worker.layers.linear import GemvLinearMethod, Linear
from loomserve.worker.layers.ops import TORCH_OPS, TRITON_OPS
from loomserve.worker.loader.build import build_model
from loomserve.worker.loader.dummy import fill_dummy_weights
from loomserve.worker.model_config import ModelConfig

CONFIG = ModelConfig.from_hf_config(
    {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": True,  # the one-row kernel adds qkv_proj's bias
        "tie_word_embeddings": False,
    },
    name="ops-test",
)
BLOCK_SIZE = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _metadata(query_lens: list[int], prefix_lens: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
    """One block table per sequence over consecutive blocks; returns the positions too."""
    starts: list[int] = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    slots: list[int] = []
    positions: list[int] = []
    next_block = 0
    for q, p in zip(query_lens, prefix_lens, strict=True):
        n = p + q
        blocks = -(-n // BLOCK_SIZE)
        table = list(range(next_block, next_block + blocks))
        next_block += blocks
        positions += range(p, n)
        slots += [table[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE for i in range(p, n)]
        starts.append(starts[-1] + q)
        seq_lens.append(n)
        tables.append(table)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return meta, torch.tensor(positions, device=DEVICE)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")  # the Triton interpreter's
@pytest.mark.parametrize("backend", [TorchAttentionBackend, TritonAttentionBackend])
@torch.inference_mode()
def test_triton_ops_match_torch_ops_for_one_row_and_several(backend):
    """Also the KV cache: the Triton rotary layer writes it (rotated keys, values) in its
    own launch and tells the attention backend, whichever it is, not to."""
    reference = build_model(CONFIG, TorchAttentionBackend, dtype=torch.float32, device=DEVICE, ops=TORCH_OPS)
    fill_dummy_weights(reference, seed=3)
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    for name, param in reference.named_parameters():
        if name.endswith("qkv_proj.bias"):
            param.normal_(generator=gen)  # dummy biases are zeros; random ones check that the kernel adds them
    model = build_model(CONFIG, backend, dtype=torch.float32, device=DEVICE, ops=TRITON_OPS)
    model.load_state_dict(reference.state_dict())
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * CONFIG.num_layers + 1
    assert all(isinstance(m.method, GemvLinearMethod) and m.method.matmul is gemv_linear for m in linears)

    caches = {
        name: allocate_kv_caches(CONFIG, 16, BLOCK_SIZE, torch.float32, DEVICE) for name in ("ours", "reference")
    }
    tokens = torch.randint(0, CONFIG.vocab_size, (12,), generator=gen, device=DEVICE)
    # A prompt of 5 tokens (several rows), then one decode step of that sequence (one row:
    # every projection and the LM head through the one-row kernel), then two sequences.
    steps = (([5], [0], tokens[:5]), ([1], [5], tokens[5:6]), ([1, 2], [6, 0], tokens[6:9]))
    for query_lens, prefix_lens, ids in steps:
        meta, positions = _metadata(query_lens, prefix_lens)
        out = {}
        for name, net in (("ours", model), ("reference", reference)):
            hidden = net(ids, positions, caches[name], meta)
            out[name] = net.compute_logits(hidden)
        assert out["ours"].shape == (sum(query_lens), CONFIG.vocab_size)
        torch.testing.assert_close(out["ours"], out["reference"], rtol=1e-4, atol=1e-4)
        for our_cache, reference_cache in zip(caches["ours"], caches["reference"], strict=True):
            torch.testing.assert_close(our_cache, reference_cache, rtol=1e-5, atol=1e-5)
