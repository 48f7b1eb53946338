"""The "llama" GGUF vocabulary: SentencePiece BPE.

llama.cpp repeatedly merges the adjacent pair whose concatenation is the best-scored token. A BPE
model whose merges are every (left, right) split of every token, ranked by that token's score,
makes the same merges, and byte fallback covers the characters the vocabulary lacks.
"""

from __future__ import annotations

from tokenizers import models

from mistralrs_serve.tokenizer.gguf_vocab import (
    SPACE_MARK,
    Json,
    Pipeline,
    Specials,
    Vocab,
    numeric_array,
)


def _spm_merges(vocab: Vocab) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, best-scored result first.

    llama.cpp merges the adjacent pair whose concatenation has the highest score
    (leftmost on ties), so a merge's rank is its result's score; ties between
    different results keep the vocabulary order.
    """
    scores = numeric_array(vocab.metadata, "scores", vocab.source, len(vocab.tokens))
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


def spm_pipeline(vocab: Vocab) -> Pipeline:
    add_space_prefix = vocab.flag("add_space_prefix", True)
    # llama.cpp prefixes a space to every stretch of text between special tokens;
    # `tokenizers` normalizes each such stretch on its own, so Prepend does the same.
    normalizers: list[Json] = [{"type": "Prepend", "prepend": SPACE_MARK}] if add_space_prefix else []
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK})
    decoders: list[Json] = [
        {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return Pipeline(
        normalizer={"type": "Sequence", "normalizers": normalizers},
        pre_tokenizer=None,
        decoder={"type": "Sequence", "decoders": decoders},
    )


def spm_model(vocab: Vocab, specials: Specials) -> models.Model:
    unk = vocab.text(specials.unk)
    return models.BPE(vocab.ids, _spm_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
