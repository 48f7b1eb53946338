"""The Triton kernels' public launchers, one module per op."""

from mistralrs_kernels.paged_attention import paged_decode_attention
from mistralrs_kernels.paged_prefill import paged_prefill_attention
from mistralrs_kernels.penalties import apply_penalties, penalty_tensors
from mistralrs_kernels.rmsnorm import rms_norm
from mistralrs_kernels.rope import rope
from mistralrs_kernels.sample import sample
from mistralrs_kernels.silu_mul import silu_mul
from mistralrs_kernels.store_kv import store_kv
from mistralrs_kernels.token_bitmask import apply_token_bitmask

__all__ = [
    "apply_penalties",
    "apply_token_bitmask",
    "paged_decode_attention",
    "paged_prefill_attention",
    "penalty_tensors",
    "rms_norm",
    "rope",
    "sample",
    "silu_mul",
    "store_kv",
]
