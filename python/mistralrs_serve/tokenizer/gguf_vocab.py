"""The vocabulary in GGUF metadata as every vocabulary type reads it: tokens and their types,
special tokens, end-of-generation ids and added tokens, and the `Pipeline` each type fills.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from tokenizers import AddedToken

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.tokenizer.special_tokens import END_OF_GENERATION_TEXTS, SpecialTokens

logger = logging.getLogger(__name__)


Json = dict[str, Any]

# GGUF token types (llama.h's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_MARK = "\u2581"  # "▁": how SentencePiece vocabularies spell a space

KEY = "tokenizer.ggml."


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
class Vocab:
    source: str
    metadata: Mapping[str, Any]
    tokens: list[str]
    types: list[int]
    ids: dict[str, int]

    def text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def token_id(self, key: str, default: int | None = None) -> int | None:
        """The id a "tokenizer.ggml.<key>" names; llama.cpp ignores ids outside the vocabulary."""
        value = self.metadata.get(KEY + key)
        if value is not None and not self._in_range(value):
            logger.warning("%s: ignoring out-of-range %s%s = %r", self.source, KEY, key, value)
            value = None
        value = default if value is None else value
        return value if self._in_range(value) else None

    def _in_range(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.tokens)

    def flag(self, key: str, default: bool) -> bool:
        value = self.metadata.get(KEY + key)
        return default if value is None else bool(value)


def is_string_array(value: Any) -> TypeGuard[list[str]]:
    # GGUF arrays hold one element type, so the first element speaks for all.
    return isinstance(value, list) and (not value or isinstance(value[0], str))


def read_vocab(metadata: Mapping[str, Any], source: str) -> Vocab:
    raw = metadata.get(KEY + "tokens")
    if not is_string_array(raw) or not raw:
        raise ModelLoadError(f"{source}: GGUF metadata has no {KEY}tokens string array")
    # llama.cpp renames empty tokens rather than refusing the model.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(raw)]
    ids = {t: i for i, t in enumerate(tokens)}
    if len(ids) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if ids[t] != i)
        raise ModelLoadError(f"{source}: duplicate token {dup!r} in {KEY}tokens")
    return Vocab(source, metadata, tokens, _token_types(metadata, source, len(tokens)), ids)


def numeric_array(metadata: Mapping[str, Any], key: str, source: str, count: int) -> list[Any] | None:
    value = metadata.get(KEY + key)
    if value is None:
        return None
    try:
        values = list(value.tolist() if hasattr(value, "tolist") else value)
    except TypeError:
        values = []
    if len(values) < count or isinstance(value, str):
        raise ModelLoadError(f"{source}: {KEY}{key} has {len(values)} entries for {count} tokens")
    return values


def _token_types(metadata: Mapping[str, Any], source: str, count: int) -> list[int]:
    types = numeric_array(metadata, "token_type", source, count)
    return [NORMAL] * count if types is None else [int(t) for t in types[:count]]


# --- Special tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Specials:
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    sep: int | None
    add_bos: bool
    add_eos: bool
    add_sep: bool


def read_specials(vocab: Vocab, model: str, add_bos_default: bool) -> Specials:
    # llama.cpp's per-model defaults, except byte-level BPE's BOS/EOS of 11 (a comma
    # in GPT-2's vocabulary): a GGUF that names neither gets none.
    bert = model == "bert"
    spm = model == "llama"
    bos = vocab.token_id("bos_token_id", 1 if spm else None)
    if bert:
        bos = bos if bos is not None else vocab.token_id("cls_token_id", 101)
    specials = Specials(
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
                f"{vocab.source}: {KEY}add_{what}_token is true but {what}_token_id is not set"
            )
    return specials


def _first_id(vocab: Vocab, texts: Iterable[str]) -> int | None:
    found = [vocab.ids[t] for t in texts if t in vocab.ids]
    return min(found) if found else None


def end_of_generation_ids(vocab: Vocab, eos: int | None) -> set[int]:
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


def special_tokens_for(vocab: Vocab, specials: Specials, eog: set[int]) -> SpecialTokens:
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


def _strip_flags(vocab: Vocab, candidates: Iterable[int]) -> tuple[set[int], set[int]]:
    """Ids that swallow whitespace to their left / right, as llama.cpp's per-model attributes say."""
    name = str(vocab.metadata.get("general.name", "")).lower()
    pre = str(vocab.metadata.get(KEY + "pre", ""))
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


def added_tokens(vocab: Vocab, eog: set[int]) -> list[AddedToken]:
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


# --- The stages each vocabulary type puts around its model ---------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """The text-processing stages around the vocabulary model, as tokenizer.json sections."""

    normalizer: Json | None
    pre_tokenizer: Json | None
    decoder: Json
