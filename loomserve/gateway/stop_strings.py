"""Cutting streamed output at the first stop string.

The output ends right before the earliest occurrence of any stop string, which is
itself not returned (OpenAI semantics). While streaming, text that could still
turn out to be the start of a stop string is held back, so a client never sees
part of one.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Finds the earliest stop string in text that arrives piece by piece.

    Feed every piece of output text to ``feed`` and send what it returns; once it
    reports a hit, generation should end and further input is ignored. At the end
    of generation without a hit, ``flush`` returns the text held back.

    At most ``len(longest stop) - 1`` characters are held back, and only those are
    searched again with each piece, so a feed costs time that grows with the new
    text and the stop strings but not with the text seen so far.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        # An empty stop string would match before the first character and end every
        # request with no output; no client means that, so it is ignored.
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        # Every proper prefix of every stop string: the tails worth holding back.
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._longest_prefix = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found (by ``feed`` or by ``flush``)."""
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Add output text; return the text safe to send now and whether a stop was hit.

        On a hit the returned text ends right before the stop string.
        """
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        window = self._held + text
        tail_start = self._tail_start(window)
        match = self._earliest_match(window)
        # A stop string found in the window is the answer only if no stop string
        # that starts earlier is still being completed: with "abcd" and "bc", the
        # text "abc" must wait to see whether "d" follows.
        if match is not None and match <= tail_start:
            self._held = ""
            self._stopped = True
            return window[:match], True
        self._held = window[tail_start:]
        return window[:tail_start], False

    def flush(self) -> str:
        """Return the text held back at the end of generation, cut at a stop if any."""
        window, self._held = self._held, ""
        if self._stopped:
            return ""
        # What is held back can contain a whole stop string that was waiting for a
        # longer one starting earlier; generation ended, so the longer one never came.
        match = self._earliest_match(window)
        if match is not None:
            self._stopped = True
            return window[:match]
        return window

    def _earliest_match(self, window: str) -> int | None:
        # Each window is searched in full: the held part is short, and a stop string
        # may start in it and end in the new text.
        found = [i for i in (window.find(s) for s in self._stops) if i >= 0]
        return min(found, default=None)

    def _tail_start(self, window: str) -> int:
        """Start of the longest suffix of ``window`` that is a proper prefix of a stop."""
        for length in range(min(self._longest_prefix, len(window)), 0, -1):
            if window[-length:] in self._prefixes:
                return len(window) - length
        return len(window)
