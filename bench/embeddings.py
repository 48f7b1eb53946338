"""Embedding speed: sentences/s of the default embedder (all-MiniLM-L6-v2, from its
PyPI wheel) for batches of 1, 32 and 256 short sentences, ours (models/sentence_embedder.py)
against sentence-transformers on the same files, in one process, alternating.

    .venv/bin/python bench/embeddings.py            # full: every batch size, best of 3 rounds
    .venv/bin/python bench/embeddings.py --smoke    # seconds: batch 32, one round (CI)

Both get the same sentences (6 to 15 words drawn from a fixed list, seeded), the same
threads, a warm-up call per batch size, and their vectors are compared (cosine) so the
two compute the same thing. Prints one JSON line per engine and batch size, then the
ratio ours / sentence-transformers; the issue's bar is >= 1.5x at batch 32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from decode import emit
from mistralrs_serve.models.packaged import packaged_directory
from mistralrs_serve.models.sentence_embedder import load_sentence_embedder

WORDS = tuple(
    [
        "the",
        "a",
        "of",
        "model",
        "text",
        "vector",
        "search",
        "query",
        "document",
        "retrieval",
        "fast",
        "local",
        "server",
        "embedding",
        "sentence",
        "meaning",
        "close",
        "question",
        "answer",
        "cache",
        "memory",
        "token",
        "window",
    ]
)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(6, 16)))) for _ in range(n)]


def rate(call: Callable[[], object], rows: int, min_seconds: float) -> float:
    """Rows per second of `call`, run until `min_seconds` have passed (after one warm-up)."""
    call()
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or runs == 0:
        call()
        runs += 1
    return rows * runs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="batch 32 only, one short round (CI)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    directory = packaged_directory("all-minilm-l6-v2")
    ours = load_sentence_embedder(directory)
    theirs = SentenceTransformer(str(directory), device="cpu")
    sizes, rounds, seconds = ((32,), 1, 0.5) if args.smoke else ((1, 32, 256), 3, 2.0)
    for size in sizes:
        batch = sentences(size)
        a, b = ours.embed_texts(batch).vectors, theirs.encode(batch, batch_size=size, convert_to_numpy=True)
        cos = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
        calls: dict[str, Callable[[], object]] = {
            "mistralrs-serve": lambda batch=batch: ours.embed_texts(batch),
            "sentence-transformers": lambda batch=batch, size=size: theirs.encode(batch, batch_size=size),
        }
        best = dict.fromkeys(calls, 0.0)
        for _ in range(rounds):  # the two take turns, each keeps its best
            for engine, call in calls.items():
                best[engine] = max(best[engine], rate(call, size, seconds))
        for engine, value in best.items():
            emit(engine, "sentences_per_s", value, batch=size, threads=args.threads)
        ratio = best["mistralrs-serve"] / best["sentence-transformers"]
        emit("mistralrs-serve", "ratio_vs_sentence_transformers", ratio, batch=size, min_cosine=round(cos, 6))


if __name__ == "__main__":
    main()
