"""llama.cpp's answers on a GGUF file, as JSON: the references that
tests/models/test_real_models_vs_llama_cpp.py holds our tokenizer, greedy
output and perplexity to.

Runs in its own environment with llama-cpp-python (a benchmark peer, never a
dependency of this project), importing nothing of ours:

    python -m venv ~/.cache/mistralrs-serve/peers
    ~/.cache/mistralrs-serve/peers/bin/pip install llama-cpp-python
    ~/.cache/mistralrs-serve/peers/bin/python bench/llama_cpp_reference.py MODEL.gguf \
        --texts ../shared/testdata/tokenizers/ggml-vocab-llama-spm.gguf.inp \
        --perplexity-text tests/data/perplexity_text.md > tests/data/llama_cpp/NAME.json

What it writes:
- "tokenize": the ids llama.cpp gives each test string (no BOS, specials not
  parsed), and a paragraph of ours.
- "greedy": the prompt's ids (with BOS), the 32 tokens llama.cpp picks
  greedily after it, and at each step the gap between the top two logits
  (a near-tie explains where another engine may part ways).
- "perplexity": the text's ids (BOS first) and each token's negative log
  likelihood given all tokens before it, one sequence, llama.cpp's fp32 logits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import llama_cpp
import numpy as np

GREEDY_PROMPT = "The capital of France is"
GREEDY_TOKENS = 32
PARAGRAPH = (
    "Paged attention keeps each sequence's keys and values in fixed-size blocks, so that "
    "a server can batch requests of very different lengths without copying.  Tokens like "
    "naïve, café, 東京, 1,234.56 and `x -> y` test the corners;\nnew lines\ttabs, and emoji 🦙 too."
)


def test_strings(path: Path) -> list[str]:
    """llama.cpp's vocab test input: strings separated by lines of __ggml_vocab_test__."""
    return path.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]


def logits_row(llm: llama_cpp.Llama, i: int, vocab: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(vocab,)).astype(np.float64)


def greedy(llm: llama_cpp.Llama, vocab: int) -> dict[str, object]:
    ids = llm.tokenize(GREEDY_PROMPT.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    out, gaps = [], []
    for _ in range(GREEDY_TOKENS):
        row = logits_row(llm, -1, vocab)
        top2 = np.sort(row)[-2:]
        tok = int(np.argmax(row))
        out.append(tok)
        gaps.append(round(float(top2[1] - top2[0]), 4))
        llm.eval([tok])
    return {"prompt": GREEDY_PROMPT, "prompt_ids": ids, "ids": out, "top2_gaps": gaps}


def perplexity(llm: llama_cpp.Llama, text: str, vocab: int) -> dict[str, object]:
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    nll = []
    for i in range(len(ids) - 1):
        row = logits_row(llm, i, vocab)
        m = row.max()
        logz = m + math.log(np.exp(row - m).sum())
        nll.append(logz - row[ids[i + 1]])
    return {"ids": ids, "nll": [round(x, 5) for x in nll], "ppl": math.exp(sum(nll) / len(nll))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--texts", type=Path, action="append", default=[], help="a vocab .inp file")
    ap.add_argument("--perplexity-text", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    text = args.perplexity_text.read_text(encoding="utf-8")
    llm = llama_cpp.Llama(
        args.model, n_ctx=4096, n_batch=4096, logits_all=True, n_threads=args.threads, verbose=False
    )
    vocab = llm.n_vocab()
    strings = [s for path in args.texts for s in test_strings(path)] + [PARAGRAPH]
    result = {
        "model": Path(args.model).name,
        "llama_cpp_python": llama_cpp.__version__,
        "tokenize": [
            {"text": s, "ids": llm.tokenize(s.encode(), add_bos=False, special=False)} for s in strings
        ],
        "greedy": greedy(llm, vocab),
        "perplexity": perplexity(llm, text, vocab),
    }
    json.dump(result, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
