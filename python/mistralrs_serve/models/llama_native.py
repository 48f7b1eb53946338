"""A model's whole step in one Rust call (`_native.NativeDecoder`), on the CPU,
over GGUF-quantized weights: the Llama network (Llama, Qwen2/3 with plain
layers) and Gemma 3's (built by models/gemma.py through the same `FusedSpec`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mistralrs_serve import _native
from mistralrs_serve.layers.block_weight import BlockWeight
from mistralrs_serve.layers.linear import AnyWeight, Linear
from mistralrs_serve.layers.rotary import RotaryTable
from mistralrs_serve.models.interface import KVPlaces
from mistralrs_serve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# per layer: (attn_norm, qkv, qkv_bias, q_norm, k_norm, o, o_bias, ffn_norm, gate_up, down)
LayerTuple = tuple[
    list[float],
    Linear,
    list[float] | None,
    list[float] | None,
    list[float] | None,
    Linear,
    list[float] | None,
    list[float],
    Linear,
    Linear,
]
# per layer: (post_attn_norm, post_ffn_norm, window, rope_table)
LayerExtras = tuple[list[float] | None, list[float] | None, int | None, int]


def f32_list(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else t.float().tolist()


@dataclass
class FusedSpec:
    """What the fused step needs of a model: its layers' weights and norms (as the
    RMSNorm multiplies, e.g. Gemma's 1 + w), the head, the embedding as loaded,
    its rotary tables, and the settings beyond Llama's."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    layers: list[LayerTuple]
    final_norm: list[float]
    head: Linear
    embed_source: AnyWeight
    dense_embed: Callable[[], torch.Tensor]  # the dense table, where the blocks' rows cannot be read
    rotary: RotaryTable
    local_rotary: RotaryTable | None = None  # the layers with rope_table 1
    extras: list[LayerExtras] | None = None
    activation: str = "silu"
    attn_scale: float | None = None
    attn_softcap: float | None = None  # the scaled scores' cap tanh(s / cap) (Gemma 2)
    embed_scale: float | None = None  # the embedding rows are multiplied by it (Gemma's sqrt(hidden))
    final_softcap: float | None = None

    def linears(self) -> list[Linear]:
        """The head, then every layer's q/k/v, o, gate/up and down."""
        return [self.head] + [
            lin for layer in self.layers for lin in (layer[1], layer[5], layer[8], layer[9])
        ]


def _matrix(lin: Linear) -> _native.QuantMatrix:
    m = lin.quant_matrix()
    assert m is not None
    return m


class NativeForward:
    """The model's steps in Rust, over the paged cache `kv` (PagedKVCache.kv_np).

    On torch a decode step of the default model is ~20 small ops per layer whose
    dispatch costs more than the arithmetic at batch 1 (14.9 ms a step, of which
    the 4-bit matmuls 4.2 ms and the bf16 head 2.9 ms). The Rust forward runs every
    layer of a step at once, decode and prefill rows alike: activations quantized
    to 8 bits per block of 32 against the GGUF's quantized weights (AVX-512 VNNI or
    AVX2), attention straight over the paged cache in bf16. Perplexity over the
    2,085 tokens of tests/data/sample_text.md within 0.2% of llama.cpp's on the
    default model (tests/models/test_real_models_vs_llama_cpp.py). Each row's
    arithmetic depends on that row alone, so a token comes out the same whatever
    shares its step.

    Used when every linear layer is GGUF blocks of a type the Rust kernels read
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; a Q4_K_M file mixes them, even
    within a fused projection), the model is on the CPU
    and the CPU has AVX-512 VNNI, AVX2 or (aarch64) NEON (`_native.QuantMatrix.kernel_path()`;
    MISTRALRS_SERVE_CPU_PATH=avx2 or =neon caps it, and =portable runs it on its plain Rust loops,
    the reference the vector paths are tested against); `--no-native-forward` turns it off.
    """

    def __init__(self, spec: FusedSpec, kv: np.ndarray, kv_layout: KVPlaces | None = None) -> None:
        layers = [
            (an, _matrix(qkv), qb, qn, kn, _matrix(o), ob, fn, _matrix(gu), _matrix(down))
            for an, qkv, qb, qn, kn, o, ob, fn, gu, down in spec.layers
        ]
        head_q = spec.head.quant_matrix(requantize=True)
        assert head_q is not None
        self.decoder = _native.NativeDecoder(
            hidden=spec.hidden,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            intermediate=spec.intermediate,
            vocab=spec.head.out_features,
            eps=spec.eps,
            layers=layers,
            final_norm=spec.final_norm,
            lm_head=head_q,
            activation=spec.activation,
            attn_scale=spec.attn_scale,
            attn_softcap=spec.attn_softcap,
            layer_extras=spec.extras,
            kv_layout=None if kv_layout is None else list(kv_layout),
        )
        # token rows straight from the quantized table (the tied head's, or the embedding's
        # own blocks), as llama.cpp reads them: no dense copy of the table
        source = spec.embed_source
        self.embed_q: _native.QuantMatrix | None = None
        if isinstance(source, BlockWeight):
            self.embed_q = head_q if spec.head.source is source else source.quant_matrix()
        if self.embed_q is None:
            # a table of a type the kernels cannot read rows of: decoded now, not on the first
            # step, so that nothing reads the mapped model file once the model is serving
            spec.dense_embed()
        # the blocks are repacked: the mapped file's pages need not stay resident too
        for blocks in [lin.source for lin in spec.linears()] + [source]:
            if isinstance(blocks, BlockWeight):
                blocks.release_pages()
        self.spec = spec
        self.vocab = spec.head.out_features
        self.kv = kv
        self.weight_bytes = int(self.decoder.weight_bytes)
        logger.info("fused CPU forward: %.1f MB of weights per decode step", self.decoder.weight_bytes / 1e6)

    @staticmethod
    def build(
        model: LlamaForCausalLM, kv: np.ndarray | None, kv_layout: KVPlaces | None = None
    ) -> NativeForward | None:
        """The fused forward for this model and cache, or None where it does not apply."""
        if not applies(model.device, kv, model.linears()[1:]):
            return None
        assert kv is not None
        return NativeForward(llama_spec(model), kv, kv_layout)

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        block_tables: np.ndarray,
        context_lens: np.ndarray,
        logit_rows: np.ndarray,
        out: np.ndarray | None = None,
    ) -> torch.Tensor:
        """fp32 logits (len(logit_rows), vocab) of one token per row, in `out` when given."""
        spec = self.spec
        with torch.inference_mode():
            if self.embed_q is not None:
                x = self.embed_q.dequantize_rows(np.ascontiguousarray(input_ids, dtype=np.int64))
            else:
                ids = torch.from_numpy(input_ids.astype(np.int64, copy=False))
                x = F.embedding(ids, spec.dense_embed()).float().numpy()
            if spec.embed_scale is not None:
                x *= np.float32(spec.embed_scale)
            pos = torch.from_numpy(positions.astype(np.int64, copy=False))
            cos, sin = (t[pos].float().numpy() for t in (spec.rotary.cos, spec.rotary.sin))
            local = spec.local_rotary
            cos_l, sin_l = (
                (None, None) if local is None else (t[pos].float().numpy() for t in (local.cos, local.sin))
            )
        shape = (len(logit_rows), self.vocab)
        if out is None:
            logits = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        else:
            logits = out
        self.decoder.forward(
            x,
            cos,
            sin,
            np.ascontiguousarray(slots, dtype=np.int64),
            np.ascontiguousarray(block_tables, dtype=np.int64),
            np.ascontiguousarray(context_lens, dtype=np.int64),
            np.ascontiguousarray(logit_rows, dtype=np.int64),
            self.kv,
            logits,
            torch.get_num_threads(),
            cos_l,
            sin_l,
        )
        result = torch.from_numpy(logits)
        if spec.final_softcap is not None:
            result.div_(spec.final_softcap).tanh_().mul_(spec.final_softcap)
        return result


def applies(device: torch.device, kv: np.ndarray | None, linears: list[Linear]) -> bool:
    """Whether the fused step can run: on the CPU, over a cache with numpy views, with a
    vector kernel (or its portable loops where MISTRALRS_SERVE_CPU_PATH=portable asks for
    them: the reference the vector paths are tested against), every linear layer GGUF
    blocks of a type the kernels read."""
    asked_portable = os.environ.get("MISTRALRS_SERVE_CPU_PATH", "").strip().lower() == "portable"
    if device.type != "cpu" or kv is None or not (_native.QuantMatrix.has_fast_kernel() or asked_portable):
        return False
    if not all(lin.has_quant_matrix() for lin in linears):
        return False
    # the repacking runs in Rust without the GIL: the matrices side by side, one per
    # thread (a 1B Q4_K_M model's engine built in 3.4 s rather than 4.5)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        return all(m is not None for m in pool.map(Linear.quant_matrix, linears))


def llama_spec(model: LlamaForCausalLM) -> FusedSpec:
    """The Llama network's layers as the fused step takes them."""
    cfg = model.config
    layers: list[LayerTuple] = [
        (
            layer.input_norm.weight.float().tolist(),
            layer.qkv,
            f32_list(layer.qkv.bias),
            f32_list(None if layer.q_norm is None else layer.q_norm.weight),
            f32_list(None if layer.k_norm is None else layer.k_norm.weight),
            layer.o,
            f32_list(layer.o.bias),
            layer.post_norm.weight.float().tolist(),
            layer.gate_up,
            layer.down,
        )
        for layer in model.layers
    ]
    return FusedSpec(
        hidden=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate=cfg.intermediate_size,
        eps=cfg.rms_norm_eps,
        layers=layers,
        final_norm=model.norm.weight.float().tolist(),
        head=model.lm_head,
        embed_source=model.embed_source,
        dense_embed=lambda: model.embed,
        rotary=model.rotary,
    )
