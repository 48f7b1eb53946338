"""The "bert" GGUF vocabulary: WordPiece.

llama.cpp's converter stores word-initial pieces with a leading "▁" and continuation pieces bare;
we turn them back into the "word" / "##piece" form that `tokenizers`' WordPiece expects.
"""

from __future__ import annotations

from tokenizers import models

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.tokenizer.gguf_vocab import (
    CONTROL,
    SPACE_MARK,
    UNKNOWN,
    USER_DEFINED,
    Pipeline,
    Specials,
    Vocab,
)


def _wordpiece_vocab(vocab: Vocab) -> dict[str, int]:
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


def bert_pipeline(vocab: Vocab) -> Pipeline:
    lowercase = vocab.flag("normalizer.lowercase", True)
    normalizer = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": True,
        "strip_accents": vocab.flag("normalizer.strip_accents", lowercase),
        "lowercase": lowercase,
    }
    return Pipeline(
        normalizer=normalizer,
        pre_tokenizer={"type": "BertPreTokenizer"},
        decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
    )


def wordpiece_model(vocab: Vocab, specials: Specials) -> models.Model:
    if specials.unk is None:
        raise ModelLoadError(f"{vocab.source}: WordPiece vocabulary has no unknown token")
    # 100 is Hugging Face's limit (llama.cpp has none): longer words become the unknown token.
    return models.WordPiece(
        _wordpiece_vocab(vocab),
        unk_token=vocab.tokens[specials.unk],
        max_input_chars_per_word=100,
        continuing_subword_prefix="##",
    )
