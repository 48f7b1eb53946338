"""A Hugging Face `tokenizers.Tokenizer` built from the vocabulary in GGUF metadata.

The result tokenizes as llama.cpp does (src/llama-vocab.cpp), so a GGUF model needs no
tokenizer.json next to it. This module assembles it; each vocabulary type ("gpt2", "llama",
"bert") has its own module (`gguf_bpe`, `gguf_spm`, `gguf_wordpiece`), and `gguf_vocab` reads
what they share: the tokens, their types and the special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from tokenizers import AddedToken, Tokenizer, models

from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.tokenizer.gguf_bpe import gpt2_model, gpt2_pipeline, pre_tokenizer_for
from mistralrs_serve.tokenizer.gguf_spm import spm_model, spm_pipeline
from mistralrs_serve.tokenizer.gguf_vocab import (
    KEY,
    Json,
    Pipeline,
    Vocab,
    added_tokens,
    end_of_generation_ids,
    read_specials,
    read_vocab,
    special_tokens_for,
)
from mistralrs_serve.tokenizer.gguf_wordpiece import bert_pipeline, wordpiece_model
from mistralrs_serve.tokenizer.special_tokens import SpecialTokens


def _post_processor(vocab: Vocab, first: int | None, last: int | None, pair_first: bool) -> Json | None:
    """`first` $A `last` (and for pairs [`first`] $B `last`): llama.cpp's BOS / EOS / BERT's CLS-SEP."""
    if first is None and last is None:
        return None

    def piece(token_id: int | None, type_id: int) -> list[Json]:
        return (
            [] if token_id is None else [{"SpecialToken": {"id": vocab.tokens[token_id], "type_id": type_id}}]
        )

    def sequence(name: str, type_id: int) -> list[Json]:
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


# --- Assembly -----------------------------------------------------------------------------------------


def _shell(pipeline: Pipeline, post_processor: Json | None) -> Tokenizer:
    """A tokenizer with every stage but the vocabulary.

    The stages come from tokenizer.json text because TemplateProcessing's Python
    form parses "token:type_id" strings and so cannot name a token containing ":".
    The vocabulary does not: the Python model constructors take about half the
    time of serializing it to JSON and parsing it back.
    """
    document: Json = {
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
    vocab: Vocab,
    build_model: Callable[[], models.Model],
    pipeline: Pipeline,
    added: list[AddedToken],
    post_processor: Json | None,
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
    model = metadata.get(KEY + "model")
    if not isinstance(model, str):
        raise ModelLoadError(f"{source}: GGUF metadata has no {KEY}model")
    if model not in ("gpt2", "llama", "bert"):
        raise UnsupportedModelError(f"{source}: tokenizer model {model!r} ({KEY}model) is not supported")
    vocab = read_vocab(metadata, source)
    pre = pre_tokenizer_for(vocab) if model == "gpt2" else None
    specials = read_specials(vocab, model, add_bos_default=pre is not None and pre.add_bos)
    eog = end_of_generation_ids(vocab, specials.eos)
    added = added_tokens(vocab, eog)
    first = specials.bos if specials.add_bos else None
    if model == "bert":
        last = specials.sep if specials.add_sep else None
        post = _post_processor(vocab, first, last, pair_first=False)
        tokenizer = _assemble(
            vocab, lambda: wordpiece_model(vocab, specials), bert_pipeline(vocab), added, post
        )
    else:
        post = _post_processor(vocab, first, specials.eos if specials.add_eos else None, pair_first=True)
        if pre is not None:
            tokenizer = _assemble(vocab, lambda: gpt2_model(vocab, pre), gpt2_pipeline(pre), added, post)
        else:
            tokenizer = _assemble(vocab, lambda: spm_model(vocab, specials), spm_pipeline(vocab), added, post)
    return tokenizer, special_tokens_for(vocab, specials, eog)
