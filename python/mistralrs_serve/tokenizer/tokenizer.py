"""The tokenizer a model runs with: ids, text, special tokens, chat template."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import tokenizers

from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.tokenizer.chat_template import ChatTemplate
from mistralrs_serve.tokenizer.special_tokens import END_OF_GENERATION_TEXTS, SpecialTokens


class Tokenizer:
    def __init__(
        self, backend: tokenizers.Tokenizer, special: SpecialTokens, chat_template: ChatTemplate | None
    ) -> None:
        self.backend = backend
        self.special = special
        self.chat_template = chat_template
        # the backend counts its whole vocabulary on each call (slow at 262k
        # entries) and is not changed after it is wrapped here
        self._vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.special.eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        vocab = self.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequestError(
                f"token ids {bad[:5]} are outside the vocabulary (size {vocab})", "tokens"
            )
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """The text one token decodes to on its own (special tokens included)."""
        return str(self.backend.decode([token_id], skip_special_tokens=False))

    def token_bytes(self, token_id: int) -> bytes:
        return token_bytes(self.backend, token_id)

    def render_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The prompt text; keyword arguments as for ChatTemplate.render."""
        if self.chat_template is None:
            raise InvalidRequestError(
                "this model has no chat template; pass one with --chat-template or use /v1/completions",
                "messages",
            )
        return self.chat_template.render(messages, **kwargs)

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        # The template writes BOS itself where the model wants one, so the
        # rendered text is encoded without adding specials (as transformers does).
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)


def end_of_generation_ids(backend: tokenizers.Tokenizer, *known: int | None) -> frozenset[int]:
    """`known` EOS ids plus every end-of-turn marker the vocabulary holds."""
    ids = {i for i in known if i is not None}
    for text in END_OF_GENERATION_TEXTS:
        token_id = backend.token_to_id(text)
        if token_id is not None:
            ids.add(token_id)
    return frozenset(ids)


def special_tokens_from_hf(
    backend: tokenizers.Tokenizer, tokenizer_config: Mapping[str, Any], eos_ids: Iterable[int]
) -> SpecialTokens:
    """SpecialTokens from tokenizer_config.json plus EOS ids from config/generation_config."""

    def token(key: str) -> str | None:
        value = tokenizer_config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    bos, eos = token("bos_token"), token("eos_token")
    bos_id = backend.token_to_id(bos) if bos else None
    eos_id = backend.token_to_id(eos) if eos else None
    return SpecialTokens(
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unk_token"),
        pad_token=token("pad_token"),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        eos_token_ids=end_of_generation_ids(backend, eos_id, *eos_ids),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
        add_eos_token=bool(tokenizer_config.get("add_eos_token", False)),
    )


def _byte_level_alphabet() -> dict[str, int]:
    # GPT-2 byte-level BPE spells each byte as one printable character:
    # printable Latin-1 bytes as themselves, the other 68 as U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = {chr(b): b for b in printable}
    chars.update({chr(256 + i): b for i, b in enumerate(extra)})
    return chars


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_BYTE_FALLBACK_LEN = len("<0x00>")


def token_bytes(backend: tokenizers.Tokenizer, token_id: int) -> bytes:
    """The raw bytes a token stands for, also for tokens that are a partial
    UTF-8 sequence (which decode to U+FFFD on their own)."""
    return _piece_bytes(backend.id_to_token(token_id), _is_byte_level(backend))


def _piece_bytes(piece: str | None, byte_level: bool) -> bytes:
    """The bytes of a vocabulary piece: a <0xNN> byte fallback, a byte-level
    spelling, or text with SentencePiece's space marker."""
    if piece is None:
        return b""
    if len(piece) == _BYTE_FALLBACK_LEN and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    if byte_level and all(c in BYTE_LEVEL_ALPHABET for c in piece):
        return bytes(BYTE_LEVEL_ALPHABET[c] for c in piece)
    return piece.replace("\u2581", " ").encode("utf-8")


def vocabulary_bytes(backend: tokenizers.Tokenizer, size: int) -> list[bytes]:
    """The bytes of token ids 0..size-1 for a grammar's token trie: added
    tokens as their text, special ones behind a 0xFF byte (so no grammar text
    ever matches them), and b"" for ids the tokenizer does not have."""
    added = backend.get_added_tokens_decoder()
    byte_level = _is_byte_level(backend)
    out: list[bytes] = []
    for token_id in range(size):
        token = added.get(token_id)
        if token is None:
            out.append(_piece_bytes(backend.id_to_token(token_id), byte_level))
        else:
            text = token.content.encode("utf-8")
            out.append(b"\xff" + text if token.special else text)
    return out


def _is_byte_level(backend: tokenizers.Tokenizer) -> bool:
    return type(backend.decoder).__name__ == "ByteLevel" or "ByteLevel" in repr(backend.decoder)
