"""What one model shape costs: parameters, useful FLOPs of a request, bytes of a decode step
(Llama layout, no biases), from its config alone, the numerators of the rooflines."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loomserve.shared.dummy_shapes import DUMMY_SHAPES
from loomserve.worker.model_config import ModelConfig


@dataclass(frozen=True)
class ShapeCosts:
    config: ModelConfig
    bytes_per_param: int

    @classmethod
    def of(cls, shape: str, dtype: torch.dtype) -> ShapeCosts:
        return cls(ModelConfig.from_hf_config(DUMMY_SHAPES[shape], name=shape), torch.finfo(dtype).bits // 8)

    @property
    def layer_linear_params(self) -> int:
        c = self.config
        return c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 3 * c.hidden_size * (
            c.intermediate_size)

    @property
    def embedding_params(self) -> int:
        return self.config.vocab_size * self.config.hidden_size

    @property
    def params(self) -> int:
        c = self.config
        norms = (2 * c.num_layers + 1) * c.hidden_size
        lm_head = 0 if c.tie_word_embeddings else self.embedding_params
        return self.embedding_params + c.num_layers * self.layer_linear_params + norms + lm_head

    def request_flops(self, prompt_len: int, output_len: int) -> float:
        """Useful FLOPs of one request: 2 x linear weights per processed token (prompt + output
        - 1), 2 x vocab x hidden per sampled token (the LM head), 4 x layers x heads x head_dim
        per (query, key) pair of causal attention."""
        if output_len < 1:
            return 0.0
        c = self.config
        processed = prompt_len + output_len - 1
        linear = 2.0 * c.num_layers * self.layer_linear_params * processed
        lm_head = 2.0 * self.embedding_params * output_len
        attention = 4.0 * c.num_layers * c.q_size * processed * (processed + 1) / 2
        return linear + lm_head + attention

    def decode_bytes_per_step(self, context: float) -> float:
        """Bytes one batch-1 decode step reads at a mean context: every weight once (an untied
        embedding table not: a step reads one row of it), plus the KV cache of the context."""
        c = self.config
        weights = self.params - (0 if c.tie_word_embeddings else self.embedding_params)
        kv_per_token = 2 * c.num_layers * c.kv_size
        return (weights + context * kv_per_token) * self.bytes_per_param
