"""tokenizer_from_gguf against llama.cpp's tokenizer golden data.

The golden files are llama.cpp's `models/ggml-vocab-*.gguf.{inp,out}`: the
vocabulary-only GGUF, the test strings, and the ids Hugging Face tokenizers
gives them with `add_special_tokens=False` (llama.cpp's test-tokenizer-0 checks
its own tokenizer against the same ids, with add_special and parse_special off).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.models.gguf_file import GGUFFile
from mistralrs_serve.tokenizer.gguf_bpe import PRE_TOKENIZERS
from mistralrs_serve.tokenizer.gguf_tokenizer import tokenizer_from_gguf
from mistralrs_serve.tokenizer.special_tokens import SpecialTokens
from tokenizers import Tokenizer, decoders

TESTDATA = Path(__file__).resolve().parents[1] / "data"
VOCABS = TESTDATA / "tokenizers"
MISSING = f"tokenizer golden data not found at {VOCABS} (tests/data is part of the repository)"

BPE_VOCABS = ("llama-bpe", "qwen2", "gpt-2", "deepseek-llm")
SPM_VOCABS = ("llama-spm", "phi-3")
WORDPIECE_VOCABS = ("bert-bge",)
ALL_VOCABS = BPE_VOCABS + SPM_VOCABS + WORDPIECE_VOCABS

# test-tokenizer-0.cpp cuts the .inp file at this separator; the text after the
# last one is empty, and the .out file has one line of ids per test string.
SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_path(vocab: str) -> Path:
    return VOCABS / f"ggml-vocab-{vocab}.gguf"


def read_cases(vocab: str) -> list[tuple[str, list[int]]]:
    path = vocab_path(vocab)
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    lines = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), f"{path}: {len(texts)} test strings but {len(lines)} id lines"
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


def case_params(vocabs: tuple[str, ...]) -> list[Any]:
    """One parameter per (vocabulary, test string), or a single skipped one without the data."""
    if not VOCABS.is_dir():
        return [pytest.param(None, 0, "", [], marks=pytest.mark.skip(reason=MISSING), id="no-golden-data")]
    params = []
    for vocab in vocabs:
        for index, (text, ids) in enumerate(read_cases(vocab)):
            params.append(pytest.param(vocab, index, text, ids, id=f"{vocab}-{index:02d}"))
    return params


@functools.cache
def load(vocab: str) -> tuple[Tokenizer, SpecialTokens]:
    path = vocab_path(vocab)
    if not path.is_file():
        pytest.skip(MISSING)
    return tokenizer_from_gguf(GGUFFile(path).metadata, str(path))


# --- Golden ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "index", "text", "expected"), case_params(ALL_VOCABS))
def test_golden_ids(vocab: str, index: int, text: str, expected: list[int]) -> None:
    tokenizer, _ = load(vocab)
    got = tokenizer.encode(text, add_special_tokens=False)
    assert got.ids == expected, f"{vocab} case {index}: {text!r} -> {got.tokens}"


# WordPiece lowercases and drops whitespace, so only BPE and SentencePiece round-trip.
@pytest.mark.parametrize(("vocab", "index", "text", "expected"), case_params(BPE_VOCABS + SPM_VOCABS))
def test_decode_round_trips(vocab: str, index: int, text: str, expected: list[int]) -> None:
    tokenizer, _ = load(vocab)
    assert tokenizer.decode(expected, skip_special_tokens=False) == text


# --- Special tokens -----------------------------------------------------------------------------------


def test_qwen2_chat_markers_are_single_special_tokens() -> None:
    tokenizer, special = load("qwen2")
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False).ids
    assert ids[0] == 151644 and 151645 in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi\n"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert {151643, 151645} <= special.eos_token_ids
    assert special.eos_token_id == 151643 and not special.add_bos_token


def test_user_defined_tokens_match_whole_but_are_not_special() -> None:
    tokenizer, _ = load("qwen2")
    ids = tokenizer.encode("a[PAD151646]b", add_special_tokens=False).ids
    assert 151646 in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a[PAD151646]b"


def test_llama3_adds_bos_only_with_special_tokens() -> None:
    tokenizer, special = load("llama-bpe")
    assert special.add_bos_token and special.bos_token_id == 128000
    assert special.bos_token == "<|begin_of_text|>"
    assert tokenizer.encode("Hello", add_special_tokens=True).ids == [128000, 9906]
    assert tokenizer.encode("Hello", add_special_tokens=False).ids == [9906]
    # Chat turns end with <|eot_id|> although the GGUF's EOS is <|end_of_text|>.
    assert special.eos_token_id == 128001 and 128009 in special.eos_token_ids
    ids = tokenizer.encode(
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", add_special_tokens=False
    ).ids
    assert ids[0] == 128006 and ids[-1] == 128009
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n\nHi"


def test_spm_bos_and_space_prefix_after_special_tokens() -> None:
    tokenizer, special = load("llama-spm")
    assert (special.bos_token, special.eos_token, special.unk_token) == ("<s>", "</s>", "<unk>")
    assert special.add_bos_token and not special.add_eos_token
    assert tokenizer.encode("Hello", add_special_tokens=True).ids == [1, 15043]
    # llama.cpp prefixes a space to every stretch of text, after special tokens too.
    ids = tokenizer.encode("Hello</s>world", add_special_tokens=False).ids
    assert ids == [15043, 2, 3186]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


def test_spm_byte_fallback() -> None:
    tokenizer, _ = load("llama-spm")
    ids = tokenizer.encode("🦙", add_special_tokens=False).ids
    assert ids == [29871, 243, 162, 169, 156]  # "▁" then the four UTF-8 bytes as <0xXX> tokens
    assert tokenizer.decode(ids) == "🦙"


def test_phi3_special_tokens_swallow_following_whitespace() -> None:
    # llama.cpp sets rstrip on Phi-3's special tokens (by general.name), mirroring its tokenizer.json.
    tokenizer, special = load("phi-3")
    ids = tokenizer.encode("<|user|>\nHi<|end|>\n<|assistant|>", add_special_tokens=False).ids
    assert ids == [32010, 6324, 32007, 32001]
    assert {32000, 32007} <= special.eos_token_ids
    assert special.eos_token == "<|endoftext|>" and special.pad_token == "<|endoftext|>"


def test_wordpiece_adds_cls_and_sep() -> None:
    tokenizer, special = load("bert-bge")
    assert special.bos_token == "[CLS]" and special.unk_token == "[UNK]" and special.pad_token == "[PAD]"
    encoding = tokenizer.encode("Hello World", add_special_tokens=True)
    assert encoding.tokens == ["[CLS]", "hello", "world", "[SEP]"]
    assert tokenizer.decode(encoding.ids) == "hello world"


def test_deepseek_special_tokens() -> None:
    tokenizer, special = load("deepseek-llm")
    assert special.bos_token_id == 100000 and special.add_bos_token
    assert special.eos_token == "<｜end▁of▁sentence｜>" and 100001 in special.eos_token_ids
    ids = tokenizer.encode("Hi<｜end▁of▁sentence｜>", add_special_tokens=True).ids
    assert ids[0] == 100000 and ids[-1] == 100001


# --- Synthetic vocabularies: no golden data needed ------------------------------------------------------


def tiny_bpe(**overrides: Any) -> dict[str, Any]:
    """A byte-level BPE vocabulary that knows "ab" and " ab" (Ġ is the byte-level space)."""
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġab", "<tool>"],
        "tokenizer.ggml.token_type": np.array([3, 3, 1, 1, 1, 1, 1, 4], dtype=np.int32),
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    meta.update(overrides)
    return meta


def test_tiny_bpe() -> None:
    tokenizer, special = tokenizer_from_gguf(tiny_bpe(), "tiny.gguf")
    encoding = tokenizer.encode("ab ab<|im_end|><tool>", add_special_tokens=True)
    assert encoding.tokens == ["ab", "Ġab", "<|im_end|>", "<tool>"]
    assert tokenizer.decode(encoding.ids) == "ab ab<tool>"
    assert special.eos_token_ids == frozenset({0, 1})
    assert not special.add_bos_token and special.bos_token_id is None


def test_end_of_generation_detection_follows_llama_cpp() -> None:
    tokens = ["<|return|>", "<|call|>", "<|end|>", "<|eot|>", "<reponame>", "<|im_end|>", "x", "y"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([3, 3, 3, 3, 3, 3, 1, 1], dtype=np.int32),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 7,
        "tokenizer.ggml.eot_token_id": 3,
    }
    _, special = tokenizer_from_gguf(meta, "eog.gguf")
    # <|end|> only closes a message where <|return|> and <|call|> end turns (gpt-oss);
    # a fill-in-the-middle repository marker ends generation as in llama.cpp.
    assert special.eos_token_ids == frozenset({0, 1, 3, 4, 5, 7})


def test_add_bos_and_eos_keys() -> None:
    meta = tiny_bpe(
        **{
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": True,
        }
    )
    tokenizer, special = tokenizer_from_gguf(meta, "tiny.gguf")
    assert special.add_bos_token and special.add_eos_token
    assert tokenizer.encode("ab", add_special_tokens=True).ids == [1, 4, 0]
    assert tokenizer.encode("ab", add_special_tokens=False).ids == [4]


def test_merges_that_make_no_token_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tokenizer, _ = tokenizer_from_gguf(tiny_bpe(**{"tokenizer.ggml.merges": ["a b", "b a", "Ġ ab"]}), "t")
    assert tokenizer.encode("ab ab", add_special_tokens=False).tokens == ["ab", "Ġab"]
    assert "dropped 1 of 3 merges" in caplog.text


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_compiles_and_keeps_all_text(pre: str) -> None:
    meta = tiny_bpe(**{"tokenizer.ggml.pre": pre, "tokenizer.ggml.bos_token_id": 1})
    tokenizer, _ = tokenizer_from_gguf(meta, "tiny.gguf")
    text = "Hello World! I'm 12345 ½ 日本語 ab  ab\r\n\tx = y; Ünïcödé"
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert len(pieces) > 5
    assert decoders.ByteLevel().decode(pieces) == text


def test_unknown_pre_tokenizer_falls_back_to_gpt2(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tokenizer, _ = tokenizer_from_gguf(tiny_bpe(**{"tokenizer.ggml.pre": "brand-new"}), "new.gguf")
    assert tokenizer.encode("ab ab", add_special_tokens=False).tokens == ["ab", "Ġab"]
    assert "brand-new" in caplog.text and "new.gguf" in caplog.text


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"tokenizer.ggml.tokens": None}, ModelLoadError, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, ModelLoadError, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.model": None}, ModelLoadError, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "rwkv"}, UnsupportedModelError, "'rwkv'"),
        ({"tokenizer.ggml.pre": "kimi-k2"}, UnsupportedModelError, "'kimi-k2'"),
        ({"tokenizer.ggml.merges": None}, ModelLoadError, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": np.array([1, 1], dtype=np.int32)}, ModelLoadError, "token_type"),
        (
            {"tokenizer.ggml.tokens": ["a", "b", "a"], "tokenizer.ggml.token_type": None},
            ModelLoadError,
            "'a'",
        ),
        ({"tokenizer.ggml.add_bos_token": True}, ModelLoadError, "bos_token_id"),
    ],
    ids=[
        "no-tokens",
        "empty-tokens",
        "no-model",
        "unknown-model",
        "unsupported-pre",
        "no-merges",
        "short-token-types",
        "duplicate-token",
        "bos-without-id",
    ],
)
def test_bad_metadata_names_the_file(change: dict[str, Any], error: type[Exception], message: str) -> None:
    meta = {key: value for key, value in tiny_bpe(**change).items() if value is not None}
    with pytest.raises(error) as raised:
        tokenizer_from_gguf(meta, "/models/broken.gguf")
    assert "/models/broken.gguf" in str(raised.value) and message in str(raised.value)


def test_tiny_spm_merges_by_score() -> None:
    # "▁ab" can come from "▁a"+"b" or "▁"+"ab"; the better-scored "ab" forms first.
    tokens = ["<unk>", "<s>", "</s>", "<0x41>", "▁", "a", "b", "ab", "▁a", "▁ab"]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array([0, 0, 0, 0, -1, -2, -3, -4, -5, -6], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3, 6, 1, 1, 1, 1, 1, 1], dtype=np.int32),
    }
    tokenizer, special = tokenizer_from_gguf(meta, "spm.gguf")
    encoding = tokenizer.encode("ab A", add_special_tokens=True)
    assert encoding.tokens == ["<s>", "▁ab", "▁", "<0x41>"]
    assert tokenizer.decode(encoding.ids) == "ab A"
    assert (special.bos_token_id, special.eos_token_id, special.unk_token) == (1, 2, "<unk>")
    assert special.eos_token_ids == frozenset({2})
