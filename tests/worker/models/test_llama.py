"""Our Llama model on the default model (SmolLM2-135M GGUF) against Hugging Face transformers.

The reference is ``AutoModelForCausalLM`` loading the same GGUF file; it is loaded
once for the module (about 16 s). Our model runs through the paged KV cache
exactly like the worker: flattened batches, scattered out-of-order blocks.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from loomserve.worker.attention.base import AttentionMetadata
from loomserve.worker.kv_cache import allocate_kv_caches
from loomserve.worker.layers.rotary import rope_inv_freq
from loomserve.worker.loader import load_model
from loomserve.worker.loader.dummy import DUMMY_SHAPES, dummy_config

# Hugging Face reference vs ours, fp32; we see about 5e-5 on logits of magnitude ~30.
ATOL = 1e-3

# Tokenised with the model's own tokenizer.
PROMPTS = {
    "france": [504, 3575, 282, 4649, 314],
    "code": [1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230, 7996, 198],
    "chat": [1, 4093, 198, 1780, 314, 260, 31469, 6740, 281, 260, 905, 47, 2, 198, 1, 520, 9531, 198],
    "story": [
        6403,
        1980,
        253,
        655,
        28,
        281,
        253,
        1165,
        6560,
        418,
        260,
        5595,
        282,
        253,
        1109,
        3150,
        28,
        665,
        4161,
        354,
        1573,
        3180,
        8692,
        352,
        284,
        650,
        1296,
        16924,
        30,
        5081,
        5738,
        384,
        13197,
        618,
        260,
        3150,
    ],
}


class PagedRunner:
    """Feeds flattened batches through our model and its paged cache, as the worker does."""

    def __init__(self, model, config, num_blocks=96, block_size=4, seed=0):
        self.model = model
        self.block_size = block_size
        self.caches = allocate_kv_caches(config, num_blocks, block_size, torch.float32, "cpu")
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)  # scattered, out-of-order block ids
        self.tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    @torch.inference_mode()
    def step(self, chunks: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Run one batch of (sequence, new tokens); return each chunk's logits (n, vocab)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for key, tokens in chunks:
            begin = self.lengths.get(key, 0)
            end = begin + len(tokens)
            table = self.tables.setdefault(key, [])
            while len(table) * bs < end:
                table.append(self.free.pop())
            ids += tokens
            positions += range(begin, end)
            slots += [table[p // bs] * bs + p % bs for p in range(begin, end)]
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            tables.append(table)
            self.lengths[key] = end
        width = max(len(t) for t in tables)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(len(t) for _, t in chunks),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.caches, meta)
        logits = self.model.compute_logits(hidden)
        return [logits[starts[i] : starts[i + 1]] for i in range(len(chunks))]


@pytest.fixture(scope="module")
def hf_model(default_model_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def ours(default_model_path):
    return load_model(default_model_path)


@torch.inference_mode()
def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([tokens])).logits[0].float()  # (n, vocab)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff < ATOL, f"max abs logit difference {diff:.2e}"


def test_config_from_gguf(ours):
    _, config = ours
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.rope_scaling is None
    assert config.vocab_size == 49152 and config.eos_token_ids == (2,) and config.bos_token_id == 1


def test_prefill_matches_hf(ours, hf_model):
    model, config = ours
    tokens = PROMPTS["story"]
    (logits,) = PagedRunner(model, config).step([("a", tokens)])
    assert logits.dtype == torch.float32 and logits.shape == (len(tokens), config.vocab_size)
    assert_logits_close(logits, hf_logits(hf_model, tokens))


def test_chunked_prefill_then_decode_matches_hf(ours, hf_model):
    model, config = ours
    runner = PagedRunner(model, config, seed=1)
    prompt = PROMPTS["story"]
    got = runner.step([("a", prompt[:17])])[0]
    got = torch.cat([got, runner.step([("a", prompt[17:])])[0]])
    tokens = list(prompt)
    for _ in range(6):
        tokens.append(int(got[-1].argmax()))
        got = torch.cat([got, runner.step([("a", tokens[-1:])])[0]])
    assert_logits_close(got, hf_logits(hf_model, tokens))


def test_mixed_batch_matches_hf(ours, hf_model):
    """Decodes, a fresh prefill and an extend of a cached prefix in one flattened batch."""
    model, config = ours
    runner = PagedRunner(model, config, seed=2)
    seqs = {"a": PROMPTS["story"][:30], "b": PROMPTS["france"], "c": PROMPTS["code"]}
    first = runner.step([(key, tokens) for key, tokens in seqs.items()])  # a multi-prefill batch
    for tokens, logits in zip(seqs.values(), first, strict=True):
        assert_logits_close(logits, hf_logits(hf_model, tokens))
    a_next, b_next = int(first[0][-1].argmax()), int(first[1][-1].argmax())
    extension = PROMPTS["chat"][:5]
    batch = [("a", [a_next]), ("d", PROMPTS["chat"]), ("b", [b_next]), ("c", extension)]
    a_out, d_out, b_out, c_out = runner.step(batch)
    assert_logits_close(a_out, hf_logits(hf_model, [*seqs["a"], a_next])[-1:])
    assert_logits_close(d_out, hf_logits(hf_model, PROMPTS["chat"]))
    assert_logits_close(b_out, hf_logits(hf_model, [*seqs["b"], b_next])[-1:])
    assert_logits_close(c_out, hf_logits(hf_model, seqs["c"] + extension)[-5:])


def test_greedy_generation_matches_hf(ours, hf_model):
    """Three prompts generated together (batched prefill, then batched decodes)."""
    model, config = ours
    runner = PagedRunner(model, config, seed=3)
    keys = ["france", "code", "chat"]
    outputs: dict[str, list[int]] = {key: [] for key in keys}
    logits = runner.step([(key, PROMPTS[key]) for key in keys])
    for _ in range(20):
        for key, rows in zip(keys, logits, strict=True):
            outputs[key].append(int(rows[-1].argmax()))
        logits = runner.step([(key, outputs[key][-1:]) for key in keys])
    for key in keys:
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([PROMPTS[key]]),
                max_new_tokens=20,
                do_sample=False,
                attention_mask=torch.ones(1, len(PROMPTS[key]), dtype=torch.int64),
                pad_token_id=config.eos_token_ids[0],
                eos_token_id=None,
            )[0, len(PROMPTS[key]) :].tolist()
        assert outputs[key] == ref, key


def test_default_model_through_safetensors(hf_model, tmp_path):
    """transformers' save_pretrained of the same model loads through our safetensors loader."""
    # transformers refuses to save a model it loaded from GGUF, so copy the weights
    # into a plain (unquantised) instance of the same config first.
    hf_config = copy.deepcopy(hf_model.config)
    del hf_config.quantization_config
    plain = type(hf_model)(hf_config)
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(tmp_path, safe_serialization=True)
    model, config = load_model(tmp_path)
    assert config.tie_word_embeddings and config.num_layers == 30
    tokens = PROMPTS["code"]
    (logits,) = PagedRunner(model, config).step([("a", tokens)])
    assert_logits_close(logits, hf_logits(hf_model, tokens))


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "smollm2-135m"])
def test_rope_frequencies_match_hf(name):
    """Our rotary frequencies (Llama 3 scaling included) equal transformers' to fp32 rounding."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = dummy_config(name)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in DUMMY_SHAPES[name].items() if k != "model_type"})
    if config.rope_scaling is None:
        arange = torch.arange(0, config.head_dim, 2).float()
        expected = 1.0 / (config.rope_theta ** (arange / config.head_dim))
    else:
        expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        assert attention_factor == 1.0
    torch.testing.assert_close(rope_inv_freq(config), expected, rtol=1e-6, atol=0)
