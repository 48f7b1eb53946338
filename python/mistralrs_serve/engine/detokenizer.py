"""Incremental detokenization: text deltas that are safe for multi-byte
UTF-8 and for tokenizers whose decode of a suffix differs from the suffix of
a decode (SentencePiece's leading space, byte-level merges)."""

from __future__ import annotations

from mistralrs_serve.tokenizer.tokenizer import Tokenizer

# Tokens of context decoded before the new ones, so that a token's leading
# space or merge reads as it does inside the full text.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens already turned into text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete UTF-8 sequence: wait for more bytes
        self.prefix_offset = max(len(self.ids) - CONTEXT_TOKENS, self.read_offset)
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Text still held back at the end of generation (a dangling byte sequence)."""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        full = self._decode(self.prefix_offset, len(self.ids))
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)
