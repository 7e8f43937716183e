"""A generated tokenizer for models that have none: dummy weights at a real model's shape.

A dummy model (``--load-format dummy --model llama-3.1-8b``) has random weights and no
tokenizer files, and the real tokenizer of the shape it copies cannot always be had. To
serve it honestly over HTTP, the gateway builds a tokenizer with the ``tokenizers``
library whose vocabulary has exactly the model's size and whose special tokens sit at
the model's BOS and EOS ids. Every id the model can sample then decodes to text, and
text prompts encode to ids the model accepts, so tokenisation, detokenisation, stop
strings and EOS handling all do the work they do for a real model.

The vocabulary, a WordPiece model over whitespace- and punctuation-split words:

| ids                          | tokens                                                  |
|------------------------------|---------------------------------------------------------|
| the shape's BOS and EOS ids  | ``<|bos|>``, ``<|eos|>``, ``<|eos_2|>``, ... (special)   |
| the lowest free ids          | ``[UNK]``, then the 94 printable ASCII characters       |
|                              | as word starts (``a``) and as continuations (``##a``)   |
| every other id ``i``         | the word ``t<i>``                                       |

So ``decode([5000, 6000])`` is ``"t5000 t6000"`` and encodes back to ``[5000, 6000]``;
any ASCII text encodes (a word missing from the vocabulary is spelled out with the
character pieces), and decodes back with one space between words and punctuation
marks. The decoder joins tokens with spaces and glues ``##`` pieces on, so the decode
of a sequence always starts with the decode of its prefix (what the incremental
detokenizer relies on). With ``add_special_tokens`` an encoding starts with BOS, as
Llama 3's does. A small chat template (``role: content`` turns) makes the chat
endpoint usable too.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

UNK = "[UNK]"
BOS = "<|bos|>"
EOS = "<|eos|>"
CONTINUATION = "##"
_CHARACTERS = string.ascii_letters + string.digits + string.punctuation
_PIECES = (UNK, *_CHARACTERS, *(CONTINUATION + c for c in _CHARACTERS))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def word_token(token_id: int) -> str:
    """The token of an id that is neither special nor a character piece."""
    return f"t{token_id}"


def synthetic_vocabulary(vocab_size: int, bos_token_id: int | None, eos_token_ids: Sequence[int]) -> list[str]:
    """The token of every id, in id order (see the module's table)."""
    if not eos_token_ids:
        raise ValueError("a synthetic tokenizer needs at least one EOS id")
    specials = special_tokens(bos_token_id, eos_token_ids)
    minimum = len(specials) + len(_PIECES) + 1
    if vocab_size < minimum:
        raise ValueError(f"a vocabulary of {vocab_size} is too small for a synthetic tokenizer (at least {minimum})")
    bad = [i for i in specials if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"special token ids {bad} are outside the vocabulary of {vocab_size}")
    tokens: list[str | None] = [None] * vocab_size
    for token_id, token in specials.items():
        tokens[token_id] = token
    free = (i for i, token in enumerate(tokens) if token is None)
    for piece, token_id in zip(_PIECES, free, strict=False):
        tokens[token_id] = piece
    return [word_token(i) if token is None else token for i, token in enumerate(tokens)]


def special_tokens(bos_token_id: int | None, eos_token_ids: Sequence[int]) -> dict[int, str]:
    """id -> token of BOS and every EOS id (the first EOS is ``<|eos|>``)."""
    specials: dict[int, str] = {}
    if bos_token_id is not None:
        specials[bos_token_id] = BOS
    for n, token_id in enumerate(dict.fromkeys(eos_token_ids), start=1):
        if token_id in specials:
            raise ValueError(f"token id {token_id} is both BOS and EOS")
        specials[token_id] = EOS if n == 1 else f"<|eos_{n}|>"
    return specials


def synthetic_tokenizer(
    vocab_size: int, bos_token_id: int | None, eos_token_ids: Sequence[int], name: str = "synthetic"
) -> PreTrainedTokenizerBase:
    """A fast Hugging Face tokenizer of exactly ``vocab_size`` tokens (takes ~0.2 s at 128k)."""
    vocabulary = synthetic_vocabulary(vocab_size, bos_token_id, eos_token_ids)
    specials = special_tokens(bos_token_id, eos_token_ids)
    model = models.WordPiece(
        {token: i for i, token in enumerate(vocabulary)},
        unk_token=UNK,
        continuing_subword_prefix=CONTINUATION,
        max_input_chars_per_word=100,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # No cleanup: it would rewrite " ," to "," after the fact, so a decode would not
    # always start with the decode of its prefix.
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=False)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials.values()])
    if bos_token_id is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_token_id)]
        )
    extra = [token for token in specials.values() if token not in (BOS, EOS)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS if bos_token_id is not None else None,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=extra,
        chat_template=CHAT_TEMPLATE,
        name_or_path=name,
    )
    if len(fast) != vocab_size:  # an added token that missed the vocabulary would grow it
        raise AssertionError(f"synthetic tokenizer has {len(fast)} tokens, not {vocab_size}")
    return fast


def synthetic_tokenizer_for(shape: Mapping[str, Any], name: str = "synthetic") -> tuple[PreTrainedTokenizerBase,
                                                                                          list[int]]:
    """The synthetic tokenizer of a Hugging Face ``config.json`` dict, and its EOS ids."""
    try:
        vocab_size = int(shape["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name}: the model config has no vocab_size") from exc
    eos = shape.get("eos_token_id")
    eos_ids = [int(i) for i in eos] if isinstance(eos, list) else [] if eos is None else [int(eos)]
    bos = shape.get("bos_token_id")
    tokenizer = synthetic_tokenizer(vocab_size, None if bos is None else int(bos), eos_ids, name)
    return tokenizer, list(dict.fromkeys(eos_ids))
