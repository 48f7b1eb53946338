"""Type stub of the Rust extension `mistralrs_serve._native` (native/python/src/lib.rs).

Hand-written: keep it in step with the `#[pyclass]` / `#[pyfunction]` signatures there;
`python -m mypy.stubtest mistralrs_serve._native` checks that it does.
"""

from collections.abc import Sequence
from typing import final

import numpy as np
from numpy.typing import NDArray

__all__ = ["SamplingParams", "__version__", "sample"]

__version__: str

@final
class SamplingParams:
    """Validated sampling options of one request, built once per request (immutable).

    Raises ValueError for an out-of-range value (temperature < 0, top_p outside (0, 1],
    NaN, ...) and OverflowError for a negative integer.
    """

    def __new__(
        cls,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Sequence[tuple[int, float]] = ...,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_sequence_breakers: Sequence[int] = ...,
        seed: int = 0,
        return_logprob: bool = False,
        num_top_logprobs: int = 0,
    ) -> SamplingParams: ...
    @property
    def temperature(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def num_top_logprobs(self) -> int: ...

def sample(
    logits: NDArray[np.float32],
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[NDArray[np.uint32]],
    output_ids: Sequence[NDArray[np.uint32]],
    steps: Sequence[int],
) -> tuple[NDArray[np.int64], NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """Sample one token per row of `logits`, a writeable C-contiguous (rows, vocab) float32 array.

    The rows are modified in place (left holding the processed logits). `params`, `prompt_ids`,
    `output_ids` and `steps` hold one entry per row; `steps[i]` is the number of tokens row i has
    generated, which with the row's seed fixes its random draw. Returns
    `(token_ids, logprobs, top_ids, top_logprobs)` of shapes (rows,), (rows,), (rows, width),
    (rows, width): logprobs are NaN where not asked for, and the top arrays are padded with
    -1 / NaN to the widest row's `num_top_logprobs`.

    Raises ValueError for a bad shape, dtype, layout or token id, RuntimeError when a row has
    no token left to sample (every logit -inf or NaN).
    """
