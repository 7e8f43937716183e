"""The linear-method interface: a method that lays its weight out differently from the
unquantised one (``TransposedLinearMethod``) plugs into the column- and row-parallel
layers and into the loaders' weight map, and computes what ``F.linear`` does. The same
method runs in a gloo tensor-parallel group in ``tests/worker/test_tensor_parallel.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.attention.torch_backend import TorchAttentionBackend
from loomserve.worker.kv_cache import allocate_kv_caches
from loomserve.worker.layers.linear import (
    ColumnParallelLinear,
    Linear,
    LinearMethod,
    RowParallelLinear,
    UnquantizedLinearMethod,
    WeightAxes,
    even_parts,
)
from loomserve.worker.layers.ops import TORCH_OPS
from loomserve.worker.loader.build import build_model
from loomserve.worker.loader.dummy import fill_dummy_weights
from loomserve.worker.loader.weights import WeightFiller
from loomserve.worker.model_config import ModelConfig
from loomserve.worker.models.llama import LlamaForCausalLM
from loomserve.worker.parallel import SINGLE


class TransposedLinearMethod(LinearMethod):
    """A toy method: the weight stored (in_features, out_features), as several quantised
    formats lay theirs out, so its output axis is 1 and its input axis 0."""

    def create_weights(self, layer: Linear, in_features: int, out_features: int) -> None:
        layer.add_weight("weight", torch.empty(in_features, out_features), WeightAxes(output=1, input=0))

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = x @ layer.get_parameter("weight")  # (T, in) @ (in, out)
        return out if bias is None else out + bias


def fill_transposed(model: LlamaForCausalLM, checkpoint: dict[str, torch.Tensor]) -> None:
    """Fill ``model`` from an unquantised checkpoint, each weight of a
    ``TransposedLinearMethod`` layer transposed into that method's layout first."""
    transposed = {
        id(m.weight) for m in model.modules() if isinstance(m, Linear) and isinstance(m.method, TransposedLinearMethod)
    }
    filler = WeightFiller(model, "test checkpoint")
    for name, tensor in checkpoint.items():
        target = filler.targets.get(name)
        filler.fill(name, tensor.t() if target is not None and id(target.param) in transposed else tensor)
    filler.check_complete()


def _load(layer: Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a full (out, in) weight into ``layer`` through the axes its method declares."""
    axes = layer.weight_axes["weight"]
    with torch.no_grad():
        layer.get_parameter("weight").copy_(weight if axes.output == 0 else weight.t())
        layer.get_parameter("bias").copy_(bias)


LAYERS: dict[str, Callable[[LinearMethod], Linear]] = {
    # Two fused projections of 24 and 8 output features.
    "column": lambda method: ColumnParallelLinear(48, even_parts((24, 8), SINGLE, "features"), True, method),
    "row": lambda method: RowParallelLinear(48, 32, True, SINGLE, method),
}


@pytest.mark.parametrize("method", [UnquantizedLinearMethod, TransposedLinearMethod])
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("rows", [1, 7])  # one row: the shape of a batch-1 decode step
def test_methods_in_parallel_layers_match_f_linear(method: type[LinearMethod], kind: str, rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = LAYERS[kind](method())
    assert (layer.in_features, layer.out_features) == (48, 32)
    weight, bias = torch.randn(32, 48, generator=gen), torch.randn(32, generator=gen)
    _load(layer, weight, bias)
    x = torch.randn(rows, 48, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias))


CONFIG = ModelConfig.from_hf_config(
    {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "attention_bias": True,  # biases on q, k, v and o
        "tie_word_embeddings": False,  # a tied head shares the embedding's (vocab, hidden) layout
    },
    name="linear-method-test",
)


@torch.inference_mode()
def _logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    n = len(tokens)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.tensor([[1, 0, 2]], dtype=torch.int32),
        slot_mapping=torch.tensor([[1, 0, 2][p // 4] * 4 + p % 4 for p in range(n)]),
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=[0, n],
        seq_lens_cpu=[n],
    )
    caches = allocate_kv_caches(CONFIG, 3, 4, torch.float32, "cpu")
    return model.compute_logits(model(tokens, torch.arange(n), caches, meta))


def test_a_method_plugs_into_the_model_and_the_weight_map() -> None:
    reference = build_model(CONFIG, TorchAttentionBackend, dtype=torch.float32, device="cpu", ops=TORCH_OPS)
    fill_dummy_weights(reference, seed=3)
    gen = torch.Generator().manual_seed(4)
    for name, param in reference.named_parameters():
        if name.endswith(".bias"):
            param.data.normal_(generator=gen)  # dummy biases are zeros; random ones check where they go
    # Every checkpoint tensor, whole, read back from the reference (a group of one keeps all of each).
    checkpoint = {
        name: target.param.narrow(target.dim, target.offset, target.length).clone()
        for name, target in WeightFiller(reference, "reference").targets.items()
    }
    ops = dataclasses.replace(TORCH_OPS, linear=TransposedLinearMethod)
    model = build_model(CONFIG, TorchAttentionBackend, dtype=torch.float32, device="cpu", ops=ops)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * CONFIG.num_layers + 1
    assert all(isinstance(m.method, TransposedLinearMethod) for m in linears)
    fill_transposed(model, checkpoint)
    tokens = torch.randint(0, CONFIG.vocab_size, (11,), generator=gen)
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens), rtol=1e-5, atol=1e-5)
