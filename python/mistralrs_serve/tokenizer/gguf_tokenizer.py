"""A Hugging Face `tokenizers.Tokenizer` built from the vocabulary in GGUF metadata.

The result tokenizes as llama.cpp does (src/llama-vocab.cpp), so a GGUF model
needs no tokenizer.json next to it:

- "gpt2": byte-level BPE. llama.cpp picks a list of split regexes by
  "tokenizer.ggml.pre" and applies them one after the other, each one cutting
  the pieces left by the previous and keeping unmatched text as pieces of its
  own; that is exactly a sequence of `Split(regex, "isolated")` pre-tokenizers.
- "llama": SentencePiece BPE. llama.cpp repeatedly merges the adjacent pair
  whose concatenation is the best-scored token. A BPE model whose merges are
  every (left, right) split of every token, ranked by that token's score, makes
  the same merges, and byte fallback covers the characters the vocabulary lacks.
- "bert": WordPiece. llama.cpp's converter stores word-initial pieces with a
  leading "▁" and continuation pieces bare; we turn them back into the
  "word" / "##piece" form that `tokenizers`' WordPiece expects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from tokenizers import AddedToken, Tokenizer, models

from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.tokenizer.special_tokens import END_OF_GENERATION_TEXTS, SpecialTokens

logger = logging.getLogger(__name__)

_Json = dict[str, Any]

# GGUF token types (llama.h's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_MARK = "\u2581"  # "▁": how SentencePiece vocabularies spell a space

_KEY = "tokenizer.ggml."

# --- Pre-tokenizer regexes (facts from llama.cpp's llm_tokenizer_bpe) -------------------------------
# Where llama.cpp rewrote a tokenizer.json regex for std::regex (and quotes the
# original in a comment) we use the original: `tokenizers` runs it natively and
# the golden token ids come from Hugging Face tokenizers.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_WORD = r"[^\r\n\p{L}\p{N}]?\p{L}+"
_PUNCT_NEWLINES = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = rf"{_CONTRACTIONS}|{_WORD}|\p{{N}}{{1,3}}|{_PUNCT_NEWLINES}"
_QWEN2 = rf"{_CONTRACTIONS}|{_WORD}|\p{{N}}|{_PUNCT_NEWLINES}"
_QWEN35 = (
    rf"{_CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+|\p{{N}}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2 = (
    rf"{_CONTRACTIONS}|{_WORD}|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+"
    + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4, "1,2"))
    + r"|\s{1}"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_NOT_LETTER_DIGIT = r"[^\r\n\p{L}\p{N}]?"
_CAPITALIZED = f"{_NOT_LETTER_DIGIT}{_UPPER}*{_LOWER}+"
_UPPERCASE = f"{_NOT_LETTER_DIGIT}{_UPPER}+{_LOWER}*"
_TAIL_SLASH = r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN = rf"{_CAPITALIZED}|{_UPPERCASE}|\p{{N}}|{_TAIL_SLASH}"
_GPT4O = rf"{_CAPITALIZED}{_CONTRACTIONS}?|{_UPPERCASE}{_CONTRACTIONS}?|\p{{N}}{{1,3}}|{_TAIL_SLASH}"
_BAILINGMOE = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
_SEED_CODER = rf"{_CONTRACTIONS}|{_WORD}|\p{{N}}{{1}}| ?[^\s\p{{L}}\p{{N}}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_EXAONE_MOE = (
    rf"{_CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?(?:\p{{L}}\p{{M}}*(?: \p{{L}}\p{{M}}*)*)+|\p{{N}}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5 = rf"{_CONTRACTIONS}|{_WORD}|\p{{N}}+|{_PUNCT_NEWLINES}"
_UFAKZEKA = rf"{_WORD}|\p{{N}}|{_PUNCT_NEWLINES}"
_ASCII_PUNCT_WORD = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
)
_DEEPSEEK3 = rf"{_ASCII_PUNCT_WORD}| ?[\p{{P}}\p{{S}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPARK2_5 = rf"{_ASCII_PUNCT_WORD}| ?[\p{{P}}\p{{S}}]+|[\r\n]|\s+(?!\S)|\s+"

# Pre-tokenizer regexes with non-ASCII character classes, exactly as llama.cpp lists them.
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟" "\u3000" r"-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-" "\ud7ff" r"]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-" "\ud7ff" r"]+",
    r"\p{N}",
)
_CJK_KANA = r"[一-龥" "\u3040" r"-ゟ゠-ヿ]+"
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_CHAMELEON = (
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    _GPT2,
)


@dataclass(frozen=True)
class _PreTokenizer:
    """What llama.cpp derives from one "tokenizer.ggml.pre" value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is a whole token skips the merges (tokenizer.json's flag)
    add_bos: bool = False  # llama.cpp's default when "tokenizer.ggml.add_bos_token" is absent


def _group(names: str, pre: _PreTokenizer) -> dict[str, _PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **_group(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    **_group("dbrx smaug-bpe glm4 chatglm-bpe", _PreTokenizer((_LLAMA3,))),
    **_group("jais-2", _PreTokenizer((_JAIS2,))),
    **_group("deepseek-llm", _PreTokenizer(_DEEPSEEK_LLM)),
    **_group("deepseek-coder", _PreTokenizer(_DEEPSEEK_CODER)),
    **_group(
        "deepseek-v3 hunyuan-dense joyai-llm hy_v4", _PreTokenizer((r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3))
    ),
    **_group("spark2_5", _PreTokenizer((r"\p{N}{1,3}", _CJK_KANA, _SPARK2_5, r"\p{N}"))),
    **_group("falcon", _PreTokenizer(_FALCON)),
    **_group(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
        _PreTokenizer((r"\p{N}", _GPT2)),
    ),
    **_group(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jina-v1-en "
        "jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4",
        _PreTokenizer((_GPT2,)),
    ),
    **_group(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 megrez hunyuan solar-open grok-2",
        _PreTokenizer((_QWEN2,)),
    ),
    **_group("qwen35", _PreTokenizer((_QWEN35,))),
    **_group("poro-chat bloom gpt3-finnish", _PreTokenizer((_PORO,))),
    **_group("viking", _PreTokenizer((_PORO, r"\p{N}"))),
    **_group("tekken", _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)),
    **_group("chameleon", _PreTokenizer(_CHAMELEON, add_bos=True)),
    **_group("gpt-4o llama4 kanana2 talkie minimax-m2", _PreTokenizer((_GPT4O,))),
    **_group("tiny_aya cohere2moe", _PreTokenizer((r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O))),
    **_group("bailingmoe bailingmoe2 llada-moe", _PreTokenizer((_BAILINGMOE,))),
    **_group("seed-coder", _PreTokenizer((_SEED_CODER,))),
    **_group("ufakzeka", _PreTokenizer((_UFAKZEKA,))),
    **_group("laguna", _PreTokenizer((r"[^\n]+|[\n]+", _QWEN2))),
    **_group("exaone-moe", _PreTokenizer((_EXAONE_MOE,))),
    **_group("minicpm5", _PreTokenizer((r"\p{N}{1,3}", _MINICPM5), ignore_merges=True)),
    **_group("default", _PreTokenizer(_DEFAULT)),
}

# Pre-tokenizers llama.cpp implements with custom code or without byte-level
# encoding: a regex stand-in would tokenize wrongly rather than approximately.
_UNSUPPORTED_PRE = frozenset({"kimi-k2", "afmoe", "superbpe", "gemma4", "sarvam-moe", "whitespace"})

# --- End of generation (llama.cpp's EOG detection, by token text) ------------------------------------

_LLAMA_CPP_EOG_TEXTS = frozenset(
    [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    ]
)
# Fill-in-the-middle pad / repository / file-separator tokens also end generation
# in llama.cpp; each is named by a key or, failing that, found by its text.
_FIM_EOG = {
    "fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep_token_id": ("<|file_sep|>",),
}


# --- Vocabulary ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vocab:
    source: str
    metadata: Mapping[str, Any]
    tokens: list[str]
    types: list[int]
    ids: dict[str, int]

    def text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def token_id(self, key: str, default: int | None = None) -> int | None:
        """The id a "tokenizer.ggml.<key>" names; llama.cpp ignores ids outside the vocabulary."""
        value = self.metadata.get(_KEY + key)
        if value is not None and not self._in_range(value):
            logger.warning("%s: ignoring out-of-range %s%s = %r", self.source, _KEY, key, value)
            value = None
        value = default if value is None else value
        return value if self._in_range(value) else None

    def _in_range(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.tokens)

    def flag(self, key: str, default: bool) -> bool:
        value = self.metadata.get(_KEY + key)
        return default if value is None else bool(value)


def _is_string_array(value: Any) -> TypeGuard[list[str]]:
    # GGUF arrays hold one element type, so the first element speaks for all.
    return isinstance(value, list) and (not value or isinstance(value[0], str))


def _read_vocab(metadata: Mapping[str, Any], source: str) -> _Vocab:
    raw = metadata.get(_KEY + "tokens")
    if not _is_string_array(raw) or not raw:
        raise ModelLoadError(f"{source}: GGUF metadata has no {_KEY}tokens string array")
    # llama.cpp renames empty tokens rather than refusing the model.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(raw)]
    ids = {t: i for i, t in enumerate(tokens)}
    if len(ids) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if ids[t] != i)
        raise ModelLoadError(f"{source}: duplicate token {dup!r} in {_KEY}tokens")
    return _Vocab(source, metadata, tokens, _token_types(metadata, source, len(tokens)), ids)


def _numeric_array(metadata: Mapping[str, Any], key: str, source: str, count: int) -> list[Any] | None:
    value = metadata.get(_KEY + key)
    if value is None:
        return None
    try:
        values = list(value.tolist() if hasattr(value, "tolist") else value)
    except TypeError:
        values = []
    if len(values) < count or isinstance(value, str):
        raise ModelLoadError(f"{source}: {_KEY}{key} has {len(values)} entries for {count} tokens")
    return values


def _token_types(metadata: Mapping[str, Any], source: str, count: int) -> list[int]:
    types = _numeric_array(metadata, "token_type", source, count)
    return [NORMAL] * count if types is None else [int(t) for t in types[:count]]


# --- Special tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Specials:
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    sep: int | None
    add_bos: bool
    add_eos: bool
    add_sep: bool


def _read_specials(vocab: _Vocab, model: str, add_bos_default: bool) -> _Specials:
    # llama.cpp's per-model defaults, except byte-level BPE's BOS/EOS of 11 (a comma
    # in GPT-2's vocabulary): a GGUF that names neither gets none.
    bert = model == "bert"
    spm = model == "llama"
    bos = vocab.token_id("bos_token_id", 1 if spm else None)
    if bert:
        bos = bos if bos is not None else vocab.token_id("cls_token_id", 101)
    specials = _Specials(
        bos=bos,
        eos=vocab.token_id("eos_token_id", 2 if spm else None),
        unk=vocab.token_id("unknown_token_id", 0 if spm else 100 if bert else None),
        pad=vocab.token_id("padding_token_id", 0 if bert else None),
        sep=vocab.token_id("seperator_token_id", 102 if bert else None),
        add_bos=vocab.flag("add_bos_token", spm or bert or add_bos_default),
        add_eos=vocab.flag("add_eos_token", False),
        add_sep=vocab.flag("add_sep_token", bert),
    )
    for flag, token_id, what in (
        (specials.add_bos, specials.bos, "bos"),
        (specials.add_eos, specials.eos, "eos"),
    ):
        if flag and token_id is None:
            raise ModelLoadError(
                f"{vocab.source}: {_KEY}add_{what}_token is true but {what}_token_id is not set"
            )
    return specials


def _first_id(vocab: _Vocab, texts: Iterable[str]) -> int | None:
    found = [vocab.ids[t] for t in texts if t in vocab.ids]
    return min(found) if found else None


def _end_of_generation_ids(vocab: _Vocab, eos: int | None) -> set[int]:
    texts = _LLAMA_CPP_EOG_TEXTS | set(END_OF_GENERATION_TEXTS)
    eog = {vocab.ids[t] for t in texts if t in vocab.ids}
    named = [eos, vocab.token_id("eot_token_id"), vocab.token_id("eom_token_id")]
    for key, texts_for_key in _FIM_EOG.items():
        named_id = vocab.token_id(key)
        named.append(_first_id(vocab, texts_for_key) if named_id is None else named_id)
    eog.update(i for i in named if i is not None)
    present = {vocab.tokens[i] for i in eog}
    # gpt-oss (harmony) ends turns with <|return|> / <|call|>; there <|end|> only
    # closes a message, and Gemma 4 uses </s> inside tool responses.
    if {"<|return|>", "<|call|>", "<|end|>"} <= present or {"<|calls|>", "<|flush|>", "<|end|>"} <= present:
        eog.discard(vocab.ids["<|end|>"])
    if {"<|tool_response>", "</s>"} <= present:
        eog.discard(vocab.ids["</s>"])
    return eog


def _special_tokens(vocab: _Vocab, specials: _Specials, eog: set[int]) -> SpecialTokens:
    return SpecialTokens(
        bos_token=vocab.text(specials.bos),
        eos_token=vocab.text(specials.eos),
        unk_token=vocab.text(specials.unk),
        pad_token=vocab.text(specials.pad),
        bos_token_id=specials.bos,
        eos_token_id=specials.eos,
        eos_token_ids=frozenset(eog),
        add_bos_token=specials.add_bos,
        add_eos_token=specials.add_eos,
    )


# --- Added tokens: text matched whole before the model sees it ---------------------------------------


def _strip_flags(vocab: _Vocab, candidates: Iterable[int]) -> tuple[set[int], set[int]]:
    """Ids that swallow whitespace to their left / right, as llama.cpp's per-model attributes say."""
    name = str(vocab.metadata.get("general.name", "")).lower()
    pre = str(vocab.metadata.get(_KEY + "pre", ""))
    arch = str(vocab.metadata.get("general.architecture", ""))
    lstrip: set[int] = set()
    rstrip: set[int] = set()
    if any(p in pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or arch in (
        "nomic-bert-moe",
        "jina-bert-v3",
    ):
        lstrip.update(vocab.ids[t] for t in ("<mask>",) if t in vocab.ids)
    elif "phi-3" in name or "phi3" in name:
        keep = {vocab.ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in vocab.ids}
        rstrip.update(set(candidates) - keep)
        rstrip.update(vocab.ids[t] for t in ("</s>",) if t in vocab.ids)
    elif "modern-bert" in name:
        lstrip.update(vocab.ids[t] for t in ("[MASK]",) if t in vocab.ids)
    return lstrip, rstrip


def _added_tokens(vocab: _Vocab, eog: set[int]) -> list[AddedToken]:
    """Control, unknown and user-defined tokens: text matched whole before the model runs.

    Control and unknown tokens are special (dropped by `skip_special_tokens`), and
    so are user-defined ones that end generation (llama.cpp makes them control);
    other user-defined tokens are plain text that must never be split. Normal
    tokens stay normal even when they end generation, so ordinary text around
    them tokenizes as it always did.
    """
    special = {i for i, t in enumerate(vocab.types) if t in (CONTROL, UNKNOWN)}
    user = {i for i, t in enumerate(vocab.types) if t == USER_DEFINED}
    special |= user & eog
    user -= special
    lstrip, rstrip = _strip_flags(vocab, special | user)
    return [
        AddedToken(
            vocab.tokens[i], lstrip=i in lstrip, rstrip=i in rstrip, normalized=False, special=i in special
        )
        for i in sorted(special | user)
    ]


def _post_processor(vocab: _Vocab, first: int | None, last: int | None, pair_first: bool) -> _Json | None:
    """`first` $A `last` (and for pairs [`first`] $B `last`): llama.cpp's BOS / EOS / BERT's CLS-SEP."""
    if first is None and last is None:
        return None

    def piece(token_id: int | None, type_id: int) -> list[_Json]:
        return (
            [] if token_id is None else [{"SpecialToken": {"id": vocab.tokens[token_id], "type_id": type_id}}]
        )

    def sequence(name: str, type_id: int) -> list[_Json]:
        return [{"Sequence": {"id": name, "type_id": type_id}}]

    single = piece(first, 0) + sequence("A", 0) + piece(last, 0)
    pair = single + piece(first if pair_first else None, 1) + sequence("B", 1) + piece(last, 1)
    used = {i for i in (first, last) if i is not None}
    return {
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": {
            vocab.tokens[i]: {"id": vocab.tokens[i], "ids": [i], "tokens": [vocab.tokens[i]]} for i in used
        },
    }


# --- Models -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pipeline:
    """The text-processing stages around the vocabulary model, as tokenizer.json sections."""

    normalizer: _Json | None
    pre_tokenizer: _Json | None
    decoder: _Json


def _pre_tokenizer_for(vocab: _Vocab) -> _PreTokenizer:
    name = vocab.metadata.get(_KEY + "pre")
    if name is None:
        logger.warning("%s: GGUF names no %spre; using llama.cpp's default pre-tokenizer", vocab.source, _KEY)
        return _PRE_TOKENIZERS["default"]
    if name in _UNSUPPORTED_PRE:
        raise UnsupportedModelError(f"{vocab.source}: pre-tokenizer {name!r} ({_KEY}pre) is not supported")
    pre = _PRE_TOKENIZERS.get(str(name))
    if pre is None:
        logger.warning("%s: unknown pre-tokenizer %r; splitting words as GPT-2 does", vocab.source, name)
        return _PRE_TOKENIZERS["gpt-2"]
    return pre


def _split(regex: str) -> _Json:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _gpt2_pipeline(pre: _PreTokenizer) -> _Pipeline:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return _Pipeline(
        normalizer=None,
        pre_tokenizer={"type": "Sequence", "pretokenizers": [*map(_split, pre.regexes), byte_level]},
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    )


def _gpt2_model(vocab: _Vocab, pre: _PreTokenizer) -> models.Model:
    merges = vocab.metadata.get(_KEY + "merges")
    if not _is_string_array(merges):
        raise ModelLoadError(f"{vocab.source}: GGUF metadata has no {_KEY}merges string array")
    try:
        # Byte-level text has no spaces, so each merge is exactly "left right".
        pairs = cast(list[tuple[str, str]], [tuple(m.split(" ", 1)) for m in merges])
        return models.BPE(vocab.ids, pairs, ignore_merges=pre.ignore_merges)
    except Exception:  # a malformed merge or one naming a non-token: rare, so only then check them all
        return models.BPE(vocab.ids, _token_merges(vocab, merges), ignore_merges=pre.ignore_merges)


def _token_merges(vocab: _Vocab, merges: list[str]) -> list[tuple[str, str]]:
    """The merges `tokenizers` accepts. llama.cpp keeps the others, but a merge whose
    parts or result are not tokens never yields a token, so dropping it changes nothing."""
    ids = vocab.ids
    kept = []
    for merge in merges:
        cut = merge.find(" ", 1)  # where llama.cpp's parser cuts
        left, right = merge[:cut], merge[cut + 1 :]
        if cut > 0 and left in ids and right in ids and left + right in ids:
            kept.append((left, right))
    logger.warning(
        "%s: dropped %d of %d merges that do not join two tokens into a token",
        vocab.source,
        len(merges) - len(kept),
        len(merges),
    )
    return kept


def _spm_merges(vocab: _Vocab) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, best-scored result first.

    llama.cpp merges the adjacent pair whose concatenation has the highest score
    (leftmost on ties), so a merge's rank is its result's score; ties between
    different results keep the vocabulary order.
    """
    scores = _numeric_array(vocab.metadata, "scores", vocab.source, len(vocab.tokens))
    score = [0.0] * len(vocab.tokens) if scores is None else [float(s) for s in scores]
    ids = vocab.ids
    ranked = []
    for merged_id, piece in enumerate(vocab.tokens):
        for cut in range(1, len(piece)):
            left_id = ids.get(piece[:cut])
            if left_id is not None and piece[cut:] in ids:
                ranked.append((-score[merged_id], merged_id, left_id, cut))
    ranked.sort()
    return [(vocab.tokens[m][:cut], vocab.tokens[m][cut:]) for _, m, _, cut in ranked]


def _spm_pipeline(vocab: _Vocab) -> _Pipeline:
    add_space_prefix = vocab.flag("add_space_prefix", True)
    # llama.cpp prefixes a space to every stretch of text between special tokens;
    # `tokenizers` normalizes each such stretch on its own, so Prepend does the same.
    normalizers: list[_Json] = [{"type": "Prepend", "prepend": SPACE_MARK}] if add_space_prefix else []
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK})
    decoders: list[_Json] = [
        {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return _Pipeline(
        normalizer={"type": "Sequence", "normalizers": normalizers},
        pre_tokenizer=None,
        decoder={"type": "Sequence", "decoders": decoders},
    )


def _spm_model(vocab: _Vocab, specials: _Specials) -> models.Model:
    unk = vocab.text(specials.unk)
    return models.BPE(vocab.ids, _spm_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)


def _wordpiece_vocab(vocab: _Vocab) -> dict[str, int]:
    """Undo llama.cpp's BERT conversion: "▁word" was "word", a bare "piece" was "##piece"."""
    out: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            word = token
        elif token.startswith(SPACE_MARK) and len(token) > 1:
            word = token[1:]
        else:
            word = "##" + token
        out.setdefault(word, i)
    return out


def _bert_pipeline(vocab: _Vocab) -> _Pipeline:
    lowercase = vocab.flag("normalizer.lowercase", True)
    normalizer = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": True,
        "strip_accents": vocab.flag("normalizer.strip_accents", lowercase),
        "lowercase": lowercase,
    }
    return _Pipeline(
        normalizer=normalizer,
        pre_tokenizer={"type": "BertPreTokenizer"},
        decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
    )


def _wordpiece_model(vocab: _Vocab, specials: _Specials) -> models.Model:
    if specials.unk is None:
        raise ModelLoadError(f"{vocab.source}: WordPiece vocabulary has no unknown token")
    # 100 is Hugging Face's limit (llama.cpp has none): longer words become the unknown token.
    return models.WordPiece(
        _wordpiece_vocab(vocab),
        unk_token=vocab.tokens[specials.unk],
        max_input_chars_per_word=100,
        continuing_subword_prefix="##",
    )


# --- Assembly -----------------------------------------------------------------------------------------


def _shell(pipeline: _Pipeline, post_processor: _Json | None) -> Tokenizer:
    """A tokenizer with every stage but the vocabulary.

    The stages come from tokenizer.json text because TemplateProcessing's Python
    form parses "token:type_id" strings and so cannot name a token containing ":".
    The vocabulary does not: the Python model constructors take about half the
    time of serializing it to JSON and parsing it back.
    """
    document: _Json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": pipeline.normalizer,
        "pre_tokenizer": pipeline.pre_tokenizer,
        "post_processor": post_processor,
        "decoder": pipeline.decoder,
        "model": {"type": "BPE", "vocab": {}, "merges": []},
    }
    return Tokenizer.from_str(json.dumps(document))


def _assemble(
    vocab: _Vocab,
    build_model: Callable[[], models.Model],
    pipeline: _Pipeline,
    added: list[AddedToken],
    post_processor: _Json | None,
) -> Tokenizer:
    try:
        tokenizer = _shell(pipeline, post_processor)
        tokenizer.model = build_model()
        tokenizer.add_tokens(added)  # each is a vocabulary token, so keeps its id
    except ModelLoadError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception for every kind of bad input
        raise ModelLoadError(f"{vocab.source}: cannot build the tokenizer from GGUF metadata ({e})") from e
    return tokenizer


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str) -> tuple[Tokenizer, SpecialTokens]:
    """The tokenizer and special tokens that the GGUF metadata describe.

    `source` names the file in error messages. Raises UnsupportedModelError for
    vocabulary types other than gpt2 / llama / bert, ModelLoadError for
    malformed tokenizer metadata.
    """
    model = metadata.get(_KEY + "model")
    if not isinstance(model, str):
        raise ModelLoadError(f"{source}: GGUF metadata has no {_KEY}model")
    if model not in ("gpt2", "llama", "bert"):
        raise UnsupportedModelError(f"{source}: tokenizer model {model!r} ({_KEY}model) is not supported")
    vocab = _read_vocab(metadata, source)
    pre = _pre_tokenizer_for(vocab) if model == "gpt2" else None
    specials = _read_specials(vocab, model, add_bos_default=pre is not None and pre.add_bos)
    eog = _end_of_generation_ids(vocab, specials.eos)
    added = _added_tokens(vocab, eog)
    first = specials.bos if specials.add_bos else None
    if model == "bert":
        last = specials.sep if specials.add_sep else None
        post = _post_processor(vocab, first, last, pair_first=False)
        tokenizer = _assemble(
            vocab, lambda: _wordpiece_model(vocab, specials), _bert_pipeline(vocab), added, post
        )
    else:
        post = _post_processor(vocab, first, specials.eos if specials.add_eos else None, pair_first=True)
        if pre is not None:
            tokenizer = _assemble(vocab, lambda: _gpt2_model(vocab, pre), _gpt2_pipeline(pre), added, post)
        else:
            tokenizer = _assemble(
                vocab, lambda: _spm_model(vocab, specials), _spm_pipeline(vocab), added, post
            )
    return tokenizer, _special_tokens(vocab, specials, eog)
