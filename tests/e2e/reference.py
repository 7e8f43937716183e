"""Hugging Face transformers as the reference, and the near-tie rule.

Exact token equality with the reference is the rule. Where float summation
order differs (batching, paged attention, recompute after preemption), greedy
decoding can legitimately flip between two tokens whose logprobs are nearly
equal. A difference is therefore accepted only at a near-tie: at the first
differing position, each side's token must be among the other side's top
logprobs and the two tokens' logprobs (on our side) must lie within
``NEAR_TIE_NATS``; after that position the sequences are no longer compared,
as vLLM's ``check_logprobs_close`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NEAR_TIE_NATS = 0.05


@dataclass
class Greedy:
    token_ids: list[int]
    top_logprobs: list[dict[int, float]]  # per position: token id -> logprob


def load_hf_model(model_path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                 dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int],
              top: int = 5) -> Greedy:
    ids = torch.tensor([prompt_ids])
    out = model.generate(  # type: ignore[operator]
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        output_scores=True, return_dict_in_generate=True, eos_token_id=eos_ids, pad_token_id=eos_ids[0],
    )
    generated = out.sequences[0, len(prompt_ids):].tolist()
    tops = []
    for scores in out.scores:
        lp = torch.log_softmax(scores[0].float(), dim=-1)
        values, indices = lp.topk(top)
        tops.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
    return Greedy(generated[: len(tops)], tops)


def assert_greedy_close(reference: Greedy, ours: Greedy, label: str) -> None:
    for i, (ref_tok, our_tok) in enumerate(zip(reference.token_ids, ours.token_ids, strict=False)):
        if ref_tok == our_tok:
            continue
        ref_top, our_top = reference.top_logprobs[i], ours.top_logprobs[i]
        near_tie = (
            our_tok in ref_top
            and ref_tok in our_top
            and abs(our_top[our_tok] - our_top[ref_tok]) <= NEAR_TIE_NATS
        )
        assert near_tie, (
            f"{label}: token {i} differs ({our_tok} vs reference {ref_tok}) without a near-tie; "
            f"ours top={our_top}, reference top={ref_top}"
        )
        return
    assert len(ours.token_ids) == len(reference.token_ids), (
        f"{label}: {len(ours.token_ids)} tokens vs reference {len(reference.token_ids)}: "
        f"{ours.token_ids} vs {reference.token_ids}"
    )
