"""The Llama family's whole step in one Rust call (`_native.NativeDecoder`), for
4-bit models on the CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from mistralrs_serve import _native
from mistralrs_serve.layers.block_weight import BlockWeight
from mistralrs_serve.layers.linear import Linear
from mistralrs_serve.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def _f32(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else t.float().tolist()


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
    to 8 bits per block of 32 against the GGUF's 4-bit weights (AVX-512 VNNI or AVX2, the
    tied head re-quantized to 8 bits), attention straight over the paged cache in
    bf16. Perplexity over 512 tokens 35.42 against torch's bf16 35.32 (llama.cpp
    35.70). Each row's arithmetic depends on that row alone, so a token comes out
    the same whatever shares its step.

    Used when every linear layer is GGUF blocks of a type the Rust kernels read
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; a Q4_K_M file mixes them, even
    within a fused projection), the model is on the CPU
    and the CPU has AVX-512 VNNI or AVX2 (`_native.QuantMatrix.kernel_path()`;
    MISTRALRS_SERVE_CPU_PATH=avx2|portable caps it); `--no-native-forward` turns it off.
    """

    def __init__(self, model: LlamaForCausalLM, kv: np.ndarray) -> None:
        cfg = model.config
        layers = []
        for layer in model.layers:
            layers.append(
                (
                    layer.input_norm.weight.float().tolist(),
                    _matrix(layer.qkv),
                    _f32(layer.qkv.bias),
                    _f32(None if layer.q_norm is None else layer.q_norm.weight),
                    _f32(None if layer.k_norm is None else layer.k_norm.weight),
                    _matrix(layer.o),
                    _f32(layer.o.bias),
                    layer.post_norm.weight.float().tolist(),
                    _matrix(layer.gate_up),
                    _matrix(layer.down),
                )
            )
        head = model.lm_head
        head_q = head.quant_matrix(requantize=True)
        assert head_q is not None
        self.decoder = _native.NativeDecoder(
            hidden=cfg.hidden_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size,
            vocab=head.out_features,
            eps=cfg.rms_norm_eps,
            layers=layers,
            final_norm=model.norm.weight.float().tolist(),
            lm_head=head_q,
        )
        # token rows straight from the quantized table (the tied head's, or the embedding's
        # own blocks), as llama.cpp reads them: no dense copy of the table
        source = model.embed_source
        self.embed_q: _native.QuantMatrix | None = None
        if isinstance(source, BlockWeight):
            self.embed_q = head_q if head.source is source else source.quant_matrix()
        # the blocks are repacked: the mapped file's pages need not stay resident too
        for blocks in [lin.source for lin in model.linears()] + [model.embed_source]:
            if isinstance(blocks, BlockWeight):
                blocks.release_pages()
        self.model = model
        self.vocab = head.out_features
        self.kv = kv
        self.weight_bytes = int(self.decoder.weight_bytes)
        logger.info("fused CPU forward: %.1f MB of weights per decode step", self.decoder.weight_bytes / 1e6)

    @staticmethod
    def build(model: LlamaForCausalLM, kv: np.ndarray | None) -> NativeForward | None:
        """The fused forward for this model and cache, or None where it does not apply."""
        if model.device.type != "cpu" or kv is None or not _native.QuantMatrix.has_fast_kernel():
            return None
        if any(lin.quant_matrix() is None for lin in model.linears()[1:]):
            return None
        return NativeForward(model, kv)

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        block_tables: np.ndarray,
        context_lens: np.ndarray,
        logit_rows: np.ndarray,
    ) -> torch.Tensor:
        """fp32 logits (len(logit_rows), vocab) of one token per row."""
        model = self.model
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids.astype(np.int64, copy=False))
            if self.embed_q is not None:
                x = self.embed_q.dequantize_rows(np.ascontiguousarray(input_ids, dtype=np.int64))
            else:
                x = F.embedding(ids, model.embed).float().numpy()
            pos = torch.from_numpy(positions.astype(np.int64, copy=False))
            cos = model.rotary.cos[pos].float().numpy()
            sin = model.rotary.sin[pos].float().numpy()
        logits = np.empty((len(logit_rows), self.vocab), dtype=np.float32)
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
        )
        return torch.from_numpy(logits)
