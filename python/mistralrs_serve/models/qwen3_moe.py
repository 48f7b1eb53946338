"""Qwen3-MoE: Qwen3's attention (an RMSNorm on each query and key head) with a
sparse mixture of experts (layers/moe.py) as the feed-forward of the layers its
config names; the others (`mlp_only_layers`, `decoder_sparse_step`) keep a
dense SwiGLU MLP.

`MoeForCausalLM` is the decoder of every MoE family here: Mixtral (mixtral.py)
is the same network without q/k norms, with its own weight names and routing.
Expert weights are read in each layout checkpoints have: transformers 5's fused
3-D `experts.gate_up_proj`/`experts.down_proj`, per-expert matrices (`experts.N.
gate_proj` or Mixtral's `w1`/`w2`/`w3`), and GGUF's stacked `ffn_*_exps`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.layers.activation import SiluAndMul
from mistralrs_serve.layers.attention import AttentionBackend, LayerAttention
from mistralrs_serve.layers.linear import AnyWeight, Linear, concat_weights
from mistralrs_serve.layers.moe import Routing, SparseMoE, check_expert_counts, dense, stack_experts
from mistralrs_serve.layers.norm import RMSNorm
from mistralrs_serve.layers.rotary import RotaryTable
from mistralrs_serve.models.interface import FusedForward, KVPlaces, every_layer_window
from mistralrs_serve.models.llama import embed_tokens, qkv_attention, rotary_tables
from mistralrs_serve.models.registry import Architecture

if TYPE_CHECKING:
    from mistralrs_serve.engine.media import StepMedia

# GGUF expert tensors (llama.cpp stacks each projection's experts into one) and
# the router, as names under model.layers.N.
EXPERT_GGUF_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# per-expert projection names: transformers' and Mixtral's original ones
_PER_EXPERT = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class DenseMLP:
    """SwiGLU with gate and up fused (a layer outside `sparse_layers`)."""

    def __init__(self, w: Mapping[str, AnyWeight], prefix: str, dtype: torch.dtype) -> None:
        self.gate_up = Linear(
            concat_weights([w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"]]), None, dtype
        )
        self.down = Linear(w[prefix + "down_proj.weight"], None, dtype)
        self.act = SiluAndMul()

    def __call__(self, x: torch.Tensor, int4_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(self.act(self.gate_up(x, int4_rows)), int4_rows)


def find_experts(w: Mapping[str, AnyWeight], layer: str, routing: Routing, dtype: torch.dtype) -> SparseMoE:
    """The MoE block of layer prefix `layer` ("model.layers.N.") in whichever layout it was saved."""
    for block in (layer + "mlp.", layer + "block_sparse_moe."):
        router = w.get(block + "gate.weight")
        if router is not None:
            gate, up, down = _expert_matrices(w, block + "experts.", routing.num_experts, dtype)
            return SparseMoE(router, gate, up, down, routing, dtype)
    raise ModelLoadError(f"{layer}mlp.gate.weight: the router of a mixture-of-experts layer is missing")


def _expert_matrices(
    w: Mapping[str, AnyWeight], p: str, num_experts: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) stacked over experts; views of the stored tensors where they are stacked already."""
    fused = w.get(p + "gate_up_proj", w.get(p + "gate_up_proj.weight"))
    down = w.get(p + "down_proj", w.get(p + "down_proj.weight"))
    if fused is not None and down is not None:  # transformers 5: (E, 2 * inter, hidden), gate rows first
        gate, up = dense(fused, dtype).chunk(2, dim=1)
        return gate, up, dense(down, dtype)
    if p + "gate_proj.weight" in w and p + "up_proj.weight" in w and down is not None:  # GGUF
        return (
            dense(w[p + "gate_proj.weight"], dtype),
            dense(w[p + "up_proj.weight"], dtype),
            dense(down, dtype),
        )
    for names in _PER_EXPERT:
        if f"{p}0.{names[0]}.weight" in w:
            per_expert = [[f"{p}{e}.{n}.weight" for e in range(num_experts)] for n in names]
            missing = [n for group in per_expert for n in group if n not in w]
            if missing:
                raise ModelLoadError(f"expert weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
            gate, up, down = (stack_experts([w[n] for n in group], dtype) for group in per_expert)
            return gate, up, down
    raise ModelLoadError(
        f"{p}: no expert weights in a known layout "
        f"({p}gate_up_proj, {p}gate_proj.weight, {p}0.gate_proj.weight)"
    )


class MoeDecoderLayer:
    def __init__(
        self,
        cfg: ModelConfig,
        idx: int,
        w: Mapping[str, AnyWeight],
        dtype: torch.dtype,
        routing: Routing | None,
    ) -> None:
        p, att, eps = f"model.layers.{idx}.", f"model.layers.{idx}.self_attn.", cfg.rms_norm_eps
        self.idx = idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.how = LayerAttention(window=cfg.sliding_window)
        self.input_norm = RMSNorm(dense(w[p + "input_layernorm.weight"], dtype), eps)
        self.post_norm = RMSNorm(dense(w[p + "post_attention_layernorm.weight"], dtype), eps)
        qkv_bias = (
            torch.cat([dense(w[att + n + "_proj.bias"], dtype) for n in "qkv"])
            if cfg.attention_bias
            else None
        )
        self.qkv = Linear(concat_weights([w[att + n + "_proj.weight"] for n in "qkv"]), qkv_bias, dtype)
        o_bias = w.get(att + "o_proj.bias")
        self.o = Linear(w[att + "o_proj.weight"], None if o_bias is None else dense(o_bias, dtype), dtype)
        self.q_norm = RMSNorm(dense(w[att + "q_norm.weight"], dtype), eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dense(w[att + "k_norm.weight"], dtype), eps) if cfg.qk_norm else None
        self.ffn: SparseMoE | DenseMLP = (
            find_experts(w, p, routing, dtype)
            if routing is not None and idx in cfg.extra["sparse_layers"]
            else DenseMLP(w, p + "mlp.", dtype)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        int4_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self._attention(self.input_norm(x), cos, sin, attn, int4_rows)
        h = self.post_norm(x)
        return x + (self.ffn(h) if isinstance(self.ffn, SparseMoE) else self.ffn(h, int4_rows))

    def _attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        int4_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        return qkv_attention(self, x, cos, sin, attn, int4_rows)

    def linears(self) -> list[Linear]:
        dense_mlp = [self.ffn.gate_up, self.ffn.down] if isinstance(self.ffn, DenseMLP) else []
        return [self.qkv, self.o, *dense_mlp]

    def norms(self) -> list[RMSNorm]:
        return [n for n in (self.input_norm, self.post_norm, self.q_norm, self.k_norm) if n is not None]


class MoeForCausalLM:
    """Token ids and positions in, logits of the selected rows out."""

    # Mixtral scales expert outputs by fp32 router weights (and always renormalises)
    fp32_router_weights = False

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, AnyWeight], dtype: torch.dtype) -> None:
        self.config, self.dtype = cfg, dtype
        self.device = torch.device("cpu")
        routing = self._routing(cfg) if cfg.extra["sparse_layers"] else None
        try:
            self.embed = dense(weights["model.embed_tokens.weight"], dtype)
            self.layers = [MoeDecoderLayer(cfg, i, weights, dtype, routing) for i in range(cfg.num_layers)]
            self.norm = RMSNorm(dense(weights["model.norm.weight"], dtype), cfg.rms_norm_eps)
            head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        except KeyError as e:
            raise ModelLoadError(f"weights are missing tensor {e}") from e
        self.lm_head = Linear(head, None, dtype)
        freq_factors = weights.get("rope_freqs")
        self.rotary = RotaryTable(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_scaling,
            cfg.max_position_embeddings,
            dtype,
            None if freq_factors is None else dense(freq_factors, torch.float64),
        )

    def _routing(self, cfg: ModelConfig) -> Routing:
        extra = cfg.extra
        return Routing(
            num_experts=int(extra["num_experts"]),
            top_k=int(extra["num_experts_per_tok"]),
            renormalize=bool(extra["norm_topk_prob"]) or self.fp32_router_weights,
            fp32_weights=self.fp32_router_weights,
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        logits_indices: torch.Tensor,
        int4_rows: torch.Tensor | None = None,
        media: StepMedia | None = None,
    ) -> torch.Tensor:
        """input_ids/positions (T,); returns fp32 logits (len(logits_indices), vocab)."""
        x = embed_tokens(self.embed, input_ids, media)
        cos, sin = rotary_tables(self.rotary, positions, media, self.config.rope_scaling.mrope_section)
        for layer in self.layers:
            x = layer.forward(x, cos, sin, attn, int4_rows)
        return self.lm_head(self.norm(x[logits_indices])).float()

    def to(self, device: torch.device | str) -> MoeForCausalLM:
        """Move every weight (in place)."""
        device = torch.device(device)
        self.device = device
        self.embed = self.embed.to(device)
        self.rotary.cos, self.rotary.sin = self.rotary.cos.to(device), self.rotary.sin.to(device)
        parts: list[Linear | RMSNorm | SparseMoE] = [*self._linears(), *self._norms(), *self._experts()]
        for part in parts:
            part.to(device)
        return self

    def use_triton(self) -> None:
        """RMSNorm and the dense layers' SwiGLU by the Triton kernels (experts stay torch)."""
        for norm in self._norms():
            norm.triton = True
        for layer in self.layers:
            if isinstance(layer.ffn, DenseMLP):
                layer.ffn.act.triton = True

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: dense layers whole, k experts per MoE layer."""
        return sum(lin.decode_bytes() for lin in self._linears()) + sum(
            moe.decode_bytes() for moe in self._experts()
        )

    def fused_forward(self, kv: np.ndarray | None, kv_layout: KVPlaces | None = None) -> FusedForward | None:
        """No fused native step for MoE families (the Rust forward is Llama's)."""
        return None

    def kv_window(self) -> int | None:
        """The window every layer attends within (a Mixtral config with one), else None."""
        return every_layer_window(layer.how for layer in self.layers)

    def layer_windows(self) -> list[int | None]:
        return [layer.how.window for layer in self.layers]

    def _linears(self) -> list[Linear]:
        return [self.lm_head] + [lin for layer in self.layers for lin in layer.linears()]

    def _norms(self) -> list[RMSNorm]:
        return [self.norm] + [n for layer in self.layers for n in layer.norms()]

    def _experts(self) -> list[SparseMoE]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, SparseMoE)]


Qwen3MoeForCausalLM = MoeForCausalLM


def moe_extra(
    num_experts: int,
    top_k: int,
    moe_intermediate_size: int,
    norm_topk_prob: bool,
    sparse_layers: Collection[int],
    names: tuple[str, str] = ("num_experts", "num_experts_per_tok"),
) -> dict[str, Any]:
    """ModelConfig.extra of an MoE family, checked; `names` are the file's keys for
    the expert count and top-k, for the error message."""
    if sparse_layers:
        check_expert_counts(num_experts, top_k, names)
        if moe_intermediate_size <= 0:
            raise ModelLoadError(f"moe_intermediate_size must be > 0, got {moe_intermediate_size}")
    return {
        "extra": {
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": moe_intermediate_size,
            "norm_topk_prob": norm_topk_prob,
            "sparse_layers": tuple(sorted(sparse_layers)),
        }
    }


def _hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    # transformers 5 writes num_experts as num_local_experts (an attribute alias)
    num_experts = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0)
    step = int(cfg.get("decoder_sparse_step", 1))
    if step <= 0:
        raise ModelLoadError(f"decoder_sparse_step must be > 0, got {step}")
    dense_only = set(cfg.get("mlp_only_layers") or [])
    num_layers = int(cfg["num_hidden_layers"])
    sparse = [i for i in range(num_layers) if num_experts and i not in dense_only and (i + 1) % step == 0]
    return moe_extra(
        num_experts,
        int(cfg.get("num_experts_per_tok", 0)),
        int(cfg.get("moe_intermediate_size", 0)),
        bool(cfg.get("norm_topk_prob", False)),
        sparse,
    )


def gguf_moe_extra(get: Callable[[str, Any], Any], tensors: Collection[str]) -> dict[str, Any]:
    """The MoE settings of a GGUF file; its MoE layers are those with a router tensor.
    llama.cpp always renormalises the top-k weights of these families."""
    sparse = [int(n.split(".")[1]) for n in tensors if n.endswith(".ffn_gate_inp.weight")]
    return moe_extra(
        int(get("expert_count", 0)),
        int(get("expert_used_count", 0)),
        int(get("expert_feed_forward_length", get("feed_forward_length", 0))),
        bool(get("expert_weights_norm", True)),
        sparse,
        ("expert_count", "expert_used_count"),
    )


QWEN3_MOE = Architecture(
    name="qwen3_moe",
    hf_names=("Qwen3MoeForCausalLM",),
    gguf_names=("qwen3moe",),
    model=Qwen3MoeForCausalLM,
    qk_norm=True,
    sliding_window=True,
    hf_extra=_hf_extra,
    gguf_extra=gguf_moe_extra,
    gguf_layer_names=EXPERT_GGUF_NAMES,
)
