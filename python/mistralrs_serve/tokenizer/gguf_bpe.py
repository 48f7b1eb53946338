"""The "gpt2" GGUF vocabulary: byte-level BPE, with the pre-tokenizer llama.cpp picks by
"tokenizer.ggml.pre".

llama.cpp applies that pre-tokenizer's split regexes one after the other, each one cutting the
pieces left by the previous and keeping unmatched text as pieces of its own; that is exactly a
sequence of `Split(regex, "isolated")` pre-tokenizers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from tokenizers import models

from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.tokenizer.gguf_vocab import (
    KEY,
    Json,
    Pipeline,
    Vocab,
    is_string_array,
)

logger = logging.getLogger(__name__)


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
class PreTokenizer:
    """What llama.cpp derives from one "tokenizer.ggml.pre" value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is a whole token skips the merges (tokenizer.json's flag)
    add_bos: bool = False  # llama.cpp's default when "tokenizer.ggml.add_bos_token" is absent


def _group(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_group(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    **_group("dbrx smaug-bpe glm4 chatglm-bpe", PreTokenizer((_LLAMA3,))),
    **_group("jais-2", PreTokenizer((_JAIS2,))),
    **_group("deepseek-llm", PreTokenizer(_DEEPSEEK_LLM)),
    **_group("deepseek-coder", PreTokenizer(_DEEPSEEK_CODER)),
    **_group(
        "deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizer((r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3))
    ),
    **_group("spark2_5", PreTokenizer((r"\p{N}{1,3}", _CJK_KANA, _SPARK2_5, r"\p{N}"))),
    **_group("falcon", PreTokenizer(_FALCON)),
    **_group(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
        PreTokenizer((r"\p{N}", _GPT2)),
    ),
    **_group(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jina-v1-en "
        "jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4",
        PreTokenizer((_GPT2,)),
    ),
    **_group(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 megrez hunyuan solar-open grok-2",
        PreTokenizer((_QWEN2,)),
    ),
    **_group("qwen35", PreTokenizer((_QWEN35,))),
    **_group("poro-chat bloom gpt3-finnish", PreTokenizer((_PORO,))),
    **_group("viking", PreTokenizer((_PORO, r"\p{N}"))),
    **_group("tekken", PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)),
    **_group("chameleon", PreTokenizer(_CHAMELEON, add_bos=True)),
    **_group("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer((_GPT4O,))),
    **_group("tiny_aya cohere2moe", PreTokenizer((r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O))),
    **_group("bailingmoe bailingmoe2 llada-moe", PreTokenizer((_BAILINGMOE,))),
    **_group("seed-coder", PreTokenizer((_SEED_CODER,))),
    **_group("ufakzeka", PreTokenizer((_UFAKZEKA,))),
    **_group("laguna", PreTokenizer((r"[^\n]+|[\n]+", _QWEN2))),
    **_group("exaone-moe", PreTokenizer((_EXAONE_MOE,))),
    **_group("minicpm5", PreTokenizer((r"\p{N}{1,3}", _MINICPM5), ignore_merges=True)),
    **_group("default", PreTokenizer(_DEFAULT)),
}

# Pre-tokenizers llama.cpp implements with custom code or without byte-level
# encoding: a regex stand-in would tokenize wrongly rather than approximately.
_UNSUPPORTED_PRE = frozenset({"kimi-k2", "afmoe", "superbpe", "gemma4", "sarvam-moe", "whitespace"})


def pre_tokenizer_for(vocab: Vocab) -> PreTokenizer:
    name = vocab.metadata.get(KEY + "pre")
    if name is None:
        logger.warning("%s: GGUF names no %spre; using llama.cpp's default pre-tokenizer", vocab.source, KEY)
        return PRE_TOKENIZERS["default"]
    if name in _UNSUPPORTED_PRE:
        raise UnsupportedModelError(f"{vocab.source}: pre-tokenizer {name!r} ({KEY}pre) is not supported")
    pre = PRE_TOKENIZERS.get(str(name))
    if pre is None:
        logger.warning("%s: unknown pre-tokenizer %r; splitting words as GPT-2 does", vocab.source, name)
        return PRE_TOKENIZERS["gpt-2"]
    return pre


def _split(regex: str) -> Json:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def gpt2_pipeline(pre: PreTokenizer) -> Pipeline:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return Pipeline(
        normalizer=None,
        pre_tokenizer={"type": "Sequence", "pretokenizers": [*map(_split, pre.regexes), byte_level]},
        decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    )


def gpt2_model(vocab: Vocab, pre: PreTokenizer) -> models.Model:
    merges = vocab.metadata.get(KEY + "merges")
    if not is_string_array(merges):
        raise ModelLoadError(f"{vocab.source}: GGUF metadata has no {KEY}merges string array")
    try:
        # Byte-level text has no spaces, so each merge is exactly "left right".
        pairs = cast(list[tuple[str, str]], [tuple(m.split(" ", 1)) for m in merges])
        return models.BPE(vocab.ids, pairs, ignore_merges=pre.ignore_merges)
    except Exception:  # a malformed merge or one naming a non-token: rare, so only then check them all
        return models.BPE(vocab.ids, _token_merges(vocab, merges), ignore_merges=pre.ignore_merges)


def _token_merges(vocab: Vocab, merges: list[str]) -> list[tuple[str, str]]:
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
