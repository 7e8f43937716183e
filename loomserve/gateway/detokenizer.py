"""Turning a stream of generated token ids into a stream of text.

Decoding each token on its own is wrong in two ways. A byte-level token can end in
the middle of a UTF-8 character, which decodes to U+FFFD until the following
tokens supply the rest of its bytes. And some tokenizers decode a token
differently depending on its neighbours (SentencePiece drops the leading space of
the first token of a decode; byte-fallback tokens only form a character
together). So each step decodes a short window of recent tokens plus the new ones
and emits only the part of the text that is both new and final.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"

# Tokens kept before the not-yet-emitted ones so that the new tokens decode as they
# would in the full sequence: one is enough for a dropped leading space, and a
# UTF-8 character spans at most four byte tokens.
_CONTEXT_TOKENS = 4

# An incomplete character has at most three of its bytes, so the text is final up
# to a token boundary at most this many tokens back (one spare for a token that
# decodes to nothing).
_MAX_HELD_TOKENS = 4

# The window is cut back to about _CONTEXT_TOKENS once it is this long, so one step
# usually costs a single decode of a few tokens.
_MAX_WINDOW_TOKENS = 16

# Output that finds no final boundary for this many tokens is not valid UTF-8 at
# all; holding it longer would only stall the stream and grow the window.
_MAX_PENDING_TOKENS = 12


class IncrementalDetokenizer:
    """Detokenizes one output sequence, token by token or in chunks.

    Joined, the pieces returned by ``add_tokens`` and ``flush`` equal
    ``tokenizer.decode(output_ids, skip_special_tokens=...)``, and no piece ends in
    the middle of a character. A character is held back while its bytes are
    incomplete; output that stays invalid UTF-8 for several tokens is let through
    as U+FFFD, as the full decode shows it. One exception: a byte-fallback decoder
    (SentencePiece ``<0xNN>`` tokens) turns a whole run of byte tokens into U+FFFD
    when any byte in it is invalid, which a stream cannot know in advance, so for
    invalid output of such tokenizers the stream may show characters that the full
    decode replaces.

    ``prompt_ids`` (only the last few are used) give the first output tokens their
    context. For byte-level BPE tokenizers this changes nothing. For SentencePiece
    tokenizers whose decode strips a leading space, the first output token then
    keeps its space (" Paris" after "The capital of France is"), which is what a
    completions client needs to append the text to its prompt; without
    ``prompt_ids`` the text is exactly ``decode(output_ids)``, as chat clients
    expect.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Token window: context tokens followed by output tokens, some of which may
        # not be fully emitted yet.
        self._ids: list[int] = self._context(prompt_ids)
        # Characters at the start of decode(self._ids) that are already emitted (or
        # belong to the prompt).
        self._sent = len(self._decode(self._ids))
        # Output tokens added since a final boundary was last found.
        self._pending = 0

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Take newly generated tokens and return the text they complete (maybe "")."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        self._pending += len(token_ids)
        boundary, text = self._final_boundary()
        if boundary is None:
            if self._pending <= _MAX_PENDING_TOKENS:
                return ""
            log.debug("emitting %d tokens of invalid UTF-8 as U+FFFD", self._pending)
            boundary, text = len(self._ids), self._decode(self._ids)
        self._pending = 0
        piece = self._emit(text)
        if boundary > _MAX_WINDOW_TOKENS:
            self._shrink_window(boundary, text)
        return piece

    def flush(self) -> str:
        """Return the text still held back; call once, after the last token."""
        self._pending = 0
        return self._emit(self._decode(self._ids))

    def _final_boundary(self) -> tuple[int | None, str]:
        """The last token boundary up to which the window's text is final, and that text.

        Text is final unless it ends in U+FFFD, which may be a character whose
        remaining bytes are still to come. Returns (None, "") if no boundary among
        the last few tokens qualifies.
        """
        end = len(self._ids)
        for boundary in range(end, max(end - _MAX_HELD_TOKENS, 0) - 1, -1):
            text = self._decode(self._ids[:boundary])
            if not text.endswith(_REPLACEMENT):
                return boundary, text
        return None, ""

    def _emit(self, text: str) -> str:
        """Emit the part of ``text`` (a decode of the window's start) not yet emitted."""
        # A byte-fallback decoder turns a run of byte tokens into U+FFFD as a whole
        # while its last character is incomplete, so text can be shorter than what
        # was already emitted from it.
        if len(text) <= self._sent:
            return ""
        piece = text[self._sent :]
        self._sent = len(text)
        return piece

    def _shrink_window(self, boundary: int, text: str) -> None:
        """Drop emitted tokens from the window's front, keeping a few as context.

        ``text`` is the decode of the first ``boundary`` tokens, all emitted. The new
        window must start on a character boundary: a start inside a character decodes
        as U+FFFD and, with byte-fallback, would turn the following bytes into U+FFFD
        too. So nearby starts are tried and the first clean one is taken.
        """
        newest_start = boundary - _CONTEXT_TOKENS
        for start in range(newest_start, max(newest_start - _CONTEXT_TOKENS, 0), -1):
            kept = self._decode(self._ids[start:boundary])
            if kept and not kept.startswith(_REPLACEMENT) and text.endswith(kept):
                del self._ids[:start]
                self._sent = len(kept)
                return
        # No clean start nearby means the output is mostly U+FFFD; let the window
        # grow for now, but not without bound, so a step stays cheap.
        if boundary > 4 * _MAX_WINDOW_TOKENS:
            del self._ids[:newest_start]
            self._sent = len(self._decode(self._ids[:_CONTEXT_TOKENS]))

    def _context(self, prompt_ids: Sequence[int]) -> list[int]:
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        text = self._decode(context)
        # A prompt that starts or ends inside a character would make the output's
        # first characters depend on prompt bytes; decode the output on its own then.
        if not text or text.startswith(_REPLACEMENT) or text.endswith(_REPLACEMENT):
            return []
        return context

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
        # decode returns a list only for a batch of sequences, never for one.
        assert isinstance(text, str)
        return text
