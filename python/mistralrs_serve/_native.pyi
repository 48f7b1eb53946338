"""Type stub of the Rust extension `mistralrs_serve._native` (native/python/src/lib.rs).

Hand-written: keep it in step with the `#[pyclass]` / `#[pyfunction]` signatures there;
`python -m mypy.stubtest mistralrs_serve._native` checks that it does.
"""

from collections.abc import Sequence
from typing import final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "GrammarMatcher",
    "GrammarVocabulary",
    "NativeDecoder",
    "QuantMatrix",
    "SamplingParams",
    "Scheduler",
    "StepPlan",
    "StopMatcher",
    "__version__",
    "apply_token_bitmask",
    "fill_token_bitmasks",
    "packed_attention",
    "paged_decode_attention",
    "sample",
]

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
    steps: Sequence[int],
    scheduler: Scheduler | None = None,
    seq_ids: Sequence[int] | None = None,
    *,
    prompt_ids: Sequence[NDArray[np.uint32]] | None = None,
    output_ids: Sequence[NDArray[np.uint32]] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.float32], NDArray[np.int64], NDArray[np.float32]]:
    """Sample one token per row of `logits`, a writeable C-contiguous (rows, vocab) float32 array.

    The rows are modified in place (left holding the processed logits). `params` and `steps` hold
    one entry per row; `steps[i]` is the number of tokens row i has generated, which with the row's
    seed fixes its random draw. Row i's history (for penalties and DRY) is the scheduler's prompt
    and appended tokens of `seq_ids[i]`, read in place; a caller without a scheduler passes
    `prompt_ids` and `output_ids` (one uint32 array each per row) instead. Returns
    `(token_ids, logprobs, top_ids, top_logprobs)` of shapes (rows,), (rows,), (rows, width),
    (rows, width): logprobs are NaN where not asked for, and the top arrays are padded with
    -1 / NaN to the widest row's `num_top_logprobs`.

    Raises ValueError for a bad shape, dtype, layout or token id, or both or neither form of
    history; KeyError for a sequence the scheduler does not know; RuntimeError when a row has
    no token left to sample (every logit -inf or NaN). The GIL is released while sampling.
    """

def packed_attention(
    qkv: NDArray[np.float32],
    starts: NDArray[np.int64],
    num_heads: int,
    scale: float,
    out: NDArray[np.float32],
) -> None:
    """Bidirectional attention of packed sequences (encoders): qkv (rows, 3 * num_heads *
    head_dim) with each row's q, k and v side by side; sequence s is rows
    starts[s]..starts[s + 1]; out (rows, num_heads * head_dim) is written."""

def paged_decode_attention(
    q: NDArray[np.float32],
    k_cache: NDArray[np.float32] | NDArray[np.int16],
    v_cache: NDArray[np.float32] | NDArray[np.int16],
    block_tables: NDArray[np.int64],
    context_lens: NDArray[np.int64],
    scale: float,
    out: NDArray[np.float32],
) -> None:
    """Decode attention of one query row per sequence over one layer of the paged KV cache.

    q and out are C-contiguous (num_seqs, num_heads, head_dim) float32; the caches are
    C-contiguous (num_blocks, block_size, num_kv_heads, head_dim), float32 or int16 holding bf16
    bits; block_tables (num_seqs, max_blocks) and context_lens (num_seqs,) are int64. Writes
    softmax(q k^T * scale) v into out. The GIL is released. Raises TypeError for a non-array,
    ValueError for a bad shape, dtype, layout, context length or block id.
    """

@final
class StopMatcher:
    """Stop strings over a stream of decoded text deltas.

    Releases text as soon as it can no longer become part of a stop string and holds back
    the longest tail that is a prefix of one. The match that wins is the one that ends first
    (then the longest, then the first listed), whatever the split of the text into deltas.

    Raises ValueError for an empty stop string. No stop strings at all passes text through.
    """

    def __new__(cls, stops: Sequence[str]) -> StopMatcher: ...
    def push(self, delta: str) -> tuple[str, int | None]:
        """Add decoded text; return `(text to release now, index into stops of the match)`.

        On a match only the text before the stop string is released; after it every push
        returns `("", None)`.
        """

    def flush(self) -> str:
        """Release the held-back text at the end of generation ("" after a match)."""

    @property
    def finished(self) -> bool:
        """Whether a stop string has matched."""

@final
class StepPlan:
    """One step's work as the scheduler planned it: flat arrays, sequences in plan order.

    S sequences compute T tokens; sequence i's tokens are `query_lens[i]` consecutive rows of
    the token arrays, after those of the sequences before it. R of them are sampled.
    """

    @property
    def seq_ids(self) -> NDArray[np.int64]:
        """(S,) the sequence of each plan row."""
    @property
    def query_lens(self) -> NDArray[np.int64]:
        """(S,) tokens each sequence computes in this step."""
    @property
    def context_lens(self) -> NDArray[np.int64]:
        """(S,) cached tokens of each sequence once this step has run."""
    @property
    def sample(self) -> NDArray[np.bool_]:
        """(S,) whether the step computes a sequence's last known token, so one is sampled."""
    @property
    def input_ids(self) -> NDArray[np.int64]:
        """(T,) the token ids to compute."""
    @property
    def positions(self) -> NDArray[np.int64]:
        """(T,) the position of each token in its sequence."""
    @property
    def slot_mapping(self) -> NDArray[np.int64]:
        """(T,) the KV-cache slot each token writes: block * block_size + offset (in the
        first KV group)."""
    @property
    def block_tables(self) -> NDArray[np.int32]:
        """(S, max_blocks) each sequence's block ids (in the first KV group), padded with -1;
        -1 too for the blocks freed behind a sliding window (attention reads from the
        window's first block on)."""
    @property
    def group_slot_mapping(self) -> NDArray[np.int64]:
        """(G, T) every KV group's slot_mapping."""
    @property
    def group_block_tables(self) -> NDArray[np.int32]:
        """(G * S, max_blocks) every KV group's block_tables, group after group."""
    @property
    def num_groups(self) -> int:
        """The scheduler's KV groups (G)."""
    @property
    def copy_ops(self) -> NDArray[np.int64]:
        """(k, 2) (source, destination) blocks to copy before the model runs (copy-on-write)."""
    @property
    def preempted(self) -> NDArray[np.int64]:
        """Sequences this step preempted (their KV is recomputed when they run again)."""
    @property
    def logit_rows(self) -> NDArray[np.int64]:
        """(R,) the token row of each sampled sequence (its last), in plan order."""
    @property
    def sampled_seq_ids(self) -> NDArray[np.int64]:
        """(R,) the sampled sequences, in plan order: `seq_ids[sample]`."""
    @property
    def num_seqs(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def is_decode_only(self) -> bool:
        """Whether every sequence computes one token and samples it."""

@final
class Scheduler:
    """Waiting/running queues, KV block pool and prefix cache of one model."""

    def __new__(
        cls,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        cache_salt: int = 0,
        sliding_window: int | None = None,
        kv_groups: list[int | None] | None = None,
    ) -> Scheduler:
        """kv_groups: the window of each KV group of layers (None: global layers), each group
        a block table per sequence over the one pool, for models whose layers mix windows;
        not with sliding_window (the one group's window)."""
    def add(
        self,
        seq_id: int,
        prompt_ids: NDArray[np.uint32],
        num_forks: int = 0,
        spans: list[tuple[int, int, int, bool]] | None = None,
    ) -> None:
        """Queue a sequence; `spans` are (start, end, key, whole) prompt spans of content the
        ids do not tell apart (an image's placeholder tokens), kept apart in the prefix
        cache; a whole one (its tokens attend both ways) is never cut between chunks."""
    def append_token(self, seq_id: int, token_id: int) -> None: ...
    def fork(self, parent_id: int, child_id: int) -> None: ...
    def finish(self, seq_id: int) -> None: ...
    def schedule(self) -> StepPlan:
        """The next step's plan (an empty one, num_seqs 0, when nothing can run)."""
    def history(self, seq_id: int) -> tuple[NDArray[np.uint32], NDArray[np.uint32]]:
        """Copies of a sequence's prompt and of the tokens appended since (KeyError if unknown)."""
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def has_work(self) -> bool: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_used_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def sliding_window(self) -> int | None:
        """The window every layer attends within, behind which blocks are freed; None: none."""
    @property
    def kv_groups(self) -> list[int | None]:
        """Each KV group's window; one group: [sliding_window]."""
    @property
    def prefix_cache_queries(self) -> int: ...
    @property
    def prefix_cache_hits(self) -> int: ...
    @property
    def num_preemptions(self) -> int: ...

@final
class GrammarVocabulary:
    """The tokenizer's side of grammars: token i's bytes (special tokens behind 0xFF, b"" for none)."""

    def __new__(cls, tokens: Sequence[bytes], eos_ids: Sequence[int]) -> GrammarVocabulary: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def words_per_row(self) -> int: ...
    def compile(self, kind: str, source: str) -> GrammarMatcher:
        """kind: regex, json_schema, json_object, lark or llguidance; ValueError when it does not compile."""

@final
class QuantMatrix:
    """A weight matrix in blocks of 32 columns (w = scale * q + offset), repacked for
    the integer kernels; a NativeDecoder built from it shares it."""

    @staticmethod
    def from_q4(q: NDArray[np.uint8], scale: NDArray[np.float32], offset: NDArray[np.float32]) -> QuantMatrix:
        """4-bit codes (rows, cols) in 0..16, scale and offset (rows, cols // 32)."""

    @staticmethod
    def quantize_q8(w: NDArray[np.float32]) -> QuantMatrix:
        """Float weights (rows, cols) quantized to 8 bits per block of 32."""

    @staticmethod
    def from_gguf(type_name: str, data: NDArray[np.uint8], rows: int, cols: int) -> QuantMatrix:
        """A (rows, cols) tensor of GGUF type Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K
        from its bytes as the file stores them (C-contiguous uint8, any shape)."""

    @staticmethod
    def concat(parts: list[QuantMatrix]) -> QuantMatrix:
        """Matrices of equal width stacked by rows, each part keeping its kind."""

    def dequantize_rows(self, ids: NDArray[np.int64]) -> NDArray[np.float32]:
        """Rows `ids` as floats: (len(ids), cols)."""

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the matrix reads."""

    @staticmethod
    def has_fast_kernel() -> bool:
        """Whether this CPU runs a vector kernel (AVX-512 VNNI, AVX2 or NEON), which
        the fused forward needs to be fast; MISTRALRS_SERVE_CPU_PATH caps it."""

    @staticmethod
    def kernel_path() -> str:
        """The integer products' instruction set: "avx512", "avx2", "neon-dotprod", "neon"
        or "portable"."""

    @staticmethod
    def supported_paths() -> list[str]:
        """Every path this CPU runs, fastest first (the names MISTRALRS_SERVE_CPU_PATH takes)."""

    @property
    def shape(self) -> tuple[int, int]: ...

_LayerWeights = tuple[
    list[float],
    QuantMatrix,
    list[float] | None,
    list[float] | None,
    list[float] | None,
    QuantMatrix,
    list[float] | None,
    list[float],
    QuantMatrix,
    QuantMatrix,
]

@final
class NativeDecoder:
    """A Llama-family model's step in one call: every layer for every row (decodes
    and prefill chunks), 8-bit activations against block-quantized weights, over
    the paged KV cache."""

    def __new__(
        cls,
        *,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate: int,
        vocab: int,
        eps: float,
        layers: list[_LayerWeights],
        final_norm: list[float],
        lm_head: QuantMatrix,
        activation: str = "silu",
        attn_scale: float | None = None,
        attn_softcap: float | None = None,
        layer_extras: list[tuple[list[float] | None, list[float] | None, int | None, int]] | None = None,
        kv_layout: list[tuple[int, int]] | None = None,
    ) -> NativeDecoder:
        """layers: per layer (attn_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias,
        ffn_norm, gate_up, down); activation "silu" or "gelu_tanh"; attn_scale None
        for 1 / sqrt(head_dim); attn_softcap the scaled scores' cap (`cap tanh(s / cap)`,
        Gemma 2), None for none; layer_extras per layer (post_attn_norm, post_ffn_norm,
        window, rope_table: 0 takes cos/sin, 1 cos_local/sin_local); kv_layout per layer
        (KV group, place in a cache block), None for one group with the layers in order."""

    @property
    def weight_bytes(self) -> int: ...
    def forward(
        self,
        x: NDArray[np.float32],
        cos: NDArray[np.float32],
        sin: NDArray[np.float32],
        slots: NDArray[np.int64],
        block_tables: NDArray[np.int64],
        context_lens: NDArray[np.int64],
        logit_rows: NDArray[np.int64],
        kv: NDArray[np.float32] | NDArray[np.int16],
        logits: NDArray[np.float32],
        threads: int = 1,
        cos_local: NDArray[np.float32] | None = None,
        sin_local: NDArray[np.float32] | None = None,
    ) -> None:
        """One step of one token per row (a row attends causally over positions
        0..context_len of its sequence); x is overwritten, the keys and values
        go into kv (2, cache layers, blocks, block_size, kv_heads, head_dim), the logits of
        logit_rows into logits. slots (groups * rows,) and block_tables (groups * rows,
        max_blocks) hold each KV group's, group after group; a windowed group's tables may
        hold -1 behind its window."""

@final
class GrammarMatcher:
    def consume(self, token: int) -> None:
        """RuntimeError when the grammar rejects the token (the matcher stays in error)."""
    def rollback(self, num_tokens: int) -> None: ...
    def fork(self) -> GrammarMatcher: ...
    def is_accepting(self) -> bool: ...
    @property
    def is_stopped(self) -> bool: ...
    @property
    def error(self) -> str | None: ...

def fill_token_bitmasks(matchers: Sequence[GrammarMatcher], bitmask: NDArray[np.uint32]) -> list[str | None]:
    """Row i of bitmask (rows x words_per_row) from matcher i, in parallel; each row's error or None."""

def apply_token_bitmask(logits: NDArray[np.float32], bitmask: NDArray[np.uint32]) -> None:
    """logits[r, t] = -inf where bit t of bitmask row r is 0."""
