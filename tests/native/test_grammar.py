"""The llguidance binding: vocabulary, matchers, the batch bitmask fill and
its bad inputs, over a small byte vocabulary (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from mistralrs_serve import _native

EOS, IM_END = 256, 257


def vocab() -> _native.GrammarVocabulary:
    tokens = [bytes([b]) for b in range(256)] + [b"\xff<|endoftext|>", b"\xff<|im_end|>", b"ab", b""]
    return _native.GrammarVocabulary(tokens, [EOS, IM_END])


def allowed(row: np.ndarray) -> list[int]:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).tolist()


def test_regex_masks_then_ends() -> None:
    v = vocab()
    assert v.vocab_size == 260 and v.words_per_row == 9
    m = v.compile("regex", "a[bc]")
    out = np.zeros((1, v.words_per_row), dtype=np.uint32)
    assert _native.fill_token_bitmasks([m], out) == [None]
    assert allowed(out[0]) == [ord("a"), 258]  # "a" or the two-byte token "ab"
    m.consume(258)
    _native.fill_token_bitmasks([m], out)
    assert allowed(out[0]) == [EOS, IM_END] and m.is_accepting()
    m.consume(IM_END)
    assert m.is_stopped and m.error is None


def test_batch_fill_and_apply() -> None:
    v = vocab()
    a, b = v.compile("regex", "[0-9]+"), v.compile("json_object", "")
    out = np.zeros((2, v.words_per_row), dtype=np.uint32)
    assert _native.fill_token_bitmasks([a, b], out) == [None, None]
    logits = np.zeros((2, 260), dtype=np.float32)
    _native.apply_token_bitmask(logits, out)
    assert np.flatnonzero(np.isfinite(logits[0])).tolist() == list(range(ord("0"), ord("9") + 1))
    assert np.flatnonzero(np.isfinite(logits[1])).tolist() == [ord("{")]


def test_a_failed_matcher_reports_its_row_only() -> None:
    v = vocab()
    good, bad = v.compile("regex", "x+"), v.compile("regex", "y")
    with pytest.raises(RuntimeError, match="grammar"):
        bad.consume(ord("z"))
    assert bad.error
    out = np.full((2, v.words_per_row), 7, dtype=np.uint32)
    errors = _native.fill_token_bitmasks([good, bad], out)
    assert errors[0] is None and errors[1] and not out[1].any()
    assert allowed(out[0]) == [ord("x")]


def test_fork_is_independent() -> None:
    v = vocab()
    m = v.compile("regex", "ab|ac")
    m.consume(ord("a"))
    f = m.fork()
    m.consume(ord("b"))
    f.consume(ord("c"))
    assert m.is_accepting() and f.is_accepting()


@pytest.mark.parametrize(
    ("kind", "source"),
    [("json_schema", "{"), ("lark", "start: nope"), ("regex", "(")],
)
def test_bad_grammars_raise_value_error(kind: str, source: str) -> None:
    with pytest.raises(ValueError, match="does not compile"):
        vocab().compile(kind, source)


def test_bad_arguments() -> None:
    v = vocab()
    with pytest.raises(ValueError, match="unknown grammar type"):
        v.compile("yaml", "a")
    with pytest.raises(ValueError, match="EOS"):
        _native.GrammarVocabulary([b"a"], [5])
    m = v.compile("regex", "a")
    with pytest.raises(ValueError, match="rows"):
        _native.fill_token_bitmasks([m], np.zeros((2, v.words_per_row), dtype=np.uint32))
    with pytest.raises(ValueError, match="listed twice"):
        _native.fill_token_bitmasks([m, m], np.zeros((2, v.words_per_row), dtype=np.uint32))
    with pytest.raises(ValueError, match="shape"):
        _native.fill_token_bitmasks([m], np.zeros((1, 3), dtype=np.uint32))
    with pytest.raises(TypeError):
        _native.fill_token_bitmasks([m], [[0] * v.words_per_row])
    with pytest.raises(ValueError):
        _native.apply_token_bitmask(np.zeros((1, 260), dtype=np.float32), np.zeros((1, 2), dtype=np.uint32))
