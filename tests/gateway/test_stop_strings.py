from __future__ import annotations

import itertools
import random

import pytest

from loomserve.gateway.stop_strings import StopStringMatcher


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """One-shot answer: the text before the earliest stop string, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not found:
        return text, False
    return text[: min(found)], True


def stream(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    """Feed ``pieces`` the way the gateway does, stopping at the first hit."""
    matcher = StopStringMatcher(stops)
    sent: list[str] = []
    hit = False
    for piece in pieces:
        out, hit = matcher.feed(piece)
        sent.append(out)
        if hit:
            break
    sent.append(matcher.flush())
    return "".join(sent), hit or matcher.stopped, sent


CASES = [
    # (name, stops, text, expected output)
    ("single", ["STOP"], "hello STOP world", "hello "),
    ("multiple, one present", ["xyz", "\n\n"], "line one\n\nline two", "line one"),
    ("earliest wins over list order", ["world", "hello"], "say hello world", "say "),
    ("stop at the very start", ["<end>"], "<end>trailing", ""),
    ("stop at the very end", ["<end>"], "all of it<end>", "all of it"),
    ("no stop", ["STOP"], "nothing to see here", "nothing to see here"),
    ("stop longer than the text", ["a much longer stop"], "a much", "a much"),
    ("stop is a prefix of another", ["ab", "abc"], "xxabc", "xx"),
    ("longer stop starts earlier", ["abcd", "bc"], "zabcd", "z"),
    ("shorter stop wins when the longer one breaks off", ["abcd", "bc"], "zabcx", "za"),
    ("repeated partial match", ["aab"], "aaab", "a"),
    ("overlapping self prefix", ["abab"], "abababab", ""),
    ("partial match that never completes", ["abc"], "ababab", "ababab"),
    ("unicode stop", ["。"], "一句话。第二句", "一句话"),
    ("empty stop list", [], "anything", "anything"),
    ("empty stop string is ignored", ["", "END"], "text END", "text "),
    ("duplicate stops", ["x", "x"], "abxcd", "ab"),
]


@pytest.mark.parametrize(("stops", "text", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_one_shot(stops, text, expected):
    out, hit, _ = stream(stops, [text])
    assert (out, hit) == reference_cut(text, stops)
    assert out == expected


@pytest.mark.parametrize(("stops", "text", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_two_way_split(stops, text, expected):
    for cut in range(len(text) + 1):
        out, _, _ = stream(stops, [text[:cut], text[cut:]])
        assert out == expected, f"split at {cut}"


@pytest.mark.parametrize(("stops", "text", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_one_character_at_a_time(stops, text, expected):
    out, _, sent = stream(stops, list(text))
    assert out == expected
    # A streamed client must never see any part of the stop string that ended output.
    assert "".join(sent) == expected


def test_stop_spanning_three_feeds_is_found():
    out, hit, sent = stream(["<|end|>"], ["answer <", "|en", "d|> ignored"])
    assert (out, hit) == ("answer ", True)
    assert sent[:2] == ["answer ", ""]


def test_held_back_text_is_bounded_by_longest_stop():
    matcher = StopStringMatcher(["STOP!"])
    assert matcher.feed("abcSTOP") == ("abc", False)
    assert matcher.feed("x") == ("STOPx", False)
    assert matcher.feed("ST") == ("", False)
    assert matcher.flush() == "ST"
    assert not matcher.stopped


def test_nothing_is_returned_after_a_hit():
    matcher = StopStringMatcher(["."])
    assert matcher.feed("one. two") == ("one", True)
    assert matcher.feed("more text") == ("", True)
    assert matcher.flush() == ""
    assert matcher.stopped


def test_flush_cuts_a_stop_waiting_for_a_longer_one():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("zabc") == ("z", False)
    assert matcher.flush() == "a"
    assert matcher.stopped


def test_partial_stop_never_reaches_the_client():
    stops = ["</answer>"]
    text = "x </ans </answ </answer> y"
    for cut_a, cut_b in itertools.combinations(range(len(text) + 1), 2):
        _, _, sent = stream(stops, [text[:cut_a], text[cut_a:cut_b], text[cut_b:]])
        assert "".join(sent) == "x </ans </answ "


@pytest.mark.parametrize("seed", range(300))
def test_streaming_matches_one_shot_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab c\n"
    stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
    text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out, hit, _ = stream(stops, pieces)
    assert (out, hit) == reference_cut(text, stops), (stops, pieces)


def test_held_text_stays_bounded_over_a_long_stream():
    # What is held back is what each feed searches again, so this bounds its cost.
    matcher = StopStringMatcher(["never appears", "qq"])
    total = 0
    for _ in range(5000):
        out, hit = matcher.feed(". some text never appear")
        assert not hit
        total += len(out)
    held = matcher.flush()
    assert held == "never appear"
    assert total + len(held) == 5000 * len(". some text never appear")
