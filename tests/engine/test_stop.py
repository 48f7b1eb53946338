"""Stop strings: the Rust matcher behind `StopStringMatcher`, differential against a
tiny pure-Python reference over seeded random texts, stops and splits."""

from __future__ import annotations

import random

import pytest
from mistralrs_serve._native import StopMatcher
from mistralrs_serve.engine.stop import StopStringMatcher


def reference(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """The text to release and the stop string that matched, over the whole text: the
    first end position where some stop string ends, the longest one ending there."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text.endswith(s, 0, end)]
        if hits:
            best = max(hits, key=len)  # max keeps the first listed of equal lengths
            return text[: end - len(best)], best
    return text, None


def longest_partial(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def random_splits(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 8)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def feed(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, str | None]:
    """Push `pieces` and flush, checking every step against the reference."""
    text = "".join(pieces)
    want = reference(text, stops)[0]
    m = StopStringMatcher(stops)
    out, seen = "", ""
    for piece in pieces:
        finished = m.matched is not None
        seen += piece
        released = m.push(piece)
        if finished:
            assert released == ""
        out += released
        # Never released: text the reference cuts off, in particular a partial stop
        # string that then turns into the match.
        assert want.startswith(out), (out, want, pieces, stops)
        if m.matched is None:
            # Everything that can no longer grow into a stop string is released.
            assert len(out) == len(seen) - longest_partial(seen, stops), (out, seen, stops)
    out += m.flush()
    return out, m.matched


@pytest.mark.parametrize("seed", range(20))
def test_differential_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab é🙂"
    for _ in range(100):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        stops = tuple("".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(0, 4)))
        want = reference(text, stops)
        assert feed(stops, [text]) == want
        assert feed(stops, list(text)) == want
        for _ in range(5):
            assert feed(stops, random_splits(rng, text)) == want


def test_stop_across_deltas() -> None:
    m = StopStringMatcher(("</s>",))
    assert m.push("Hello <") == "Hello "
    assert m.push("/") == ""
    assert m.push("s") == ""
    assert m.matched is None
    assert m.push("> ignored") == ""
    assert m.matched == "</s>"
    assert m.push("more") == ""
    assert m.flush() == ""


def test_held_back_text_is_flushed() -> None:
    m = StopStringMatcher(("STOP",))
    assert m.push("the end ST") == "the end "
    assert m.flush() == "ST"
    assert m.matched is None


def test_no_stops_passes_text_through() -> None:
    m = StopStringMatcher(())
    assert m._native is None
    assert m.push("abc") == "abc"
    assert m.flush() == ""
    assert m.matched is None


@pytest.mark.parametrize(
    ("text", "stops", "want"),
    [
        ("xxab", ("b", "ab"), ("xx", "ab")),  # same end: the longer one
        ("xbab", ("ab", "b"), ("x", "b")),  # "b" ends first
        ("xabcd", ("abcd", "bc"), ("xa", "bc")),  # the inner stop ends first
        ("one two three", ("two three", "two"), ("one ", "two")),  # a stop that is a prefix of another
        ("naïve → 🙂 ok", ("→ 🙂",), ("naïve ", "→ 🙂")),
    ],
)
def test_which_stop_wins(text: str, stops: tuple[str, ...], want: tuple[str, str]) -> None:
    assert reference(text, stops) == want
    assert feed(stops, [text]) == want
    assert feed(stops, list(text)) == want


def test_native_matcher() -> None:
    m = StopMatcher(["</s>", "ab"])
    assert not m.finished
    assert m.push("xx</") == ("xx", None)
    assert m.push("s>yy") == ("", 0)
    assert m.finished
    assert m.push("ab") == ("", None)
    assert m.flush() == ""


@pytest.mark.parametrize("stops", [[""], ["a", ""]])
def test_empty_stop_string_is_a_value_error(stops: list[str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(stops)
