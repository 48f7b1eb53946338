"""Grammar-constrained decoding: compiles request grammars (llguidance, in
Rust) against the model's vocabulary, and masks a step's logits rows.

The vocabulary (token trie) is built once, on the first constrained request.
Compiled grammars are kept in a small LRU: the server compiles a grammar to
validate a request before it answers, and the engine forks that matcher for
every choice of the request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from mistralrs_serve import _native
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.sampling_params import Grammar
from mistralrs_serve.tokenizer.tokenizer import Tokenizer, vocabulary_bytes

_CACHE_SIZE = 64


class GrammarCompiler:
    """Grammars of one model; thread-safe (the server validates on its event
    loop while the engine thread compiles for its sequences)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._vocab: _native.GrammarVocabulary | None = None
        self._compiled: OrderedDict[tuple[str, str], _native.GrammarMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def vocabulary(self) -> _native.GrammarVocabulary:
        with self._lock:
            if self._vocab is None:
                self._vocab = self._build_vocabulary()
            return self._vocab

    def _build_vocabulary(self) -> _native.GrammarVocabulary:
        tokens = vocabulary_bytes(self.tokenizer.backend, self.vocab_size)
        special = self.tokenizer.special
        eos = [i for i in (special.eos_token_id, *sorted(special.eos_token_ids)) if i is not None]
        eos = [i for i in dict.fromkeys(eos) if i < self.vocab_size]
        if not eos:
            raise InvalidRequestError("this model has no EOS token, so its output cannot be constrained")
        return _native.GrammarVocabulary(tokens, eos)

    def compile(self, grammar: Grammar) -> _native.GrammarMatcher:
        """A fresh matcher; InvalidRequestError (naming grammar.param) when it does not compile."""
        key = (grammar.kind, grammar.source)
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.fork()
        vocab = self.vocabulary
        try:
            template = vocab.compile(grammar.kind, grammar.source)
        except ValueError as e:
            raise InvalidRequestError(str(e), grammar.param) from None
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.fork()

    def bitmask(self, matchers: list[_native.GrammarMatcher]) -> tuple[np.ndarray, list[str | None]]:
        """One bitmask row per matcher (filled in parallel, GIL released) and each row's error."""
        out = np.zeros((len(matchers), self.vocabulary.words_per_row), dtype=np.uint32)
        return out, _native.fill_token_bitmasks(matchers, out)
