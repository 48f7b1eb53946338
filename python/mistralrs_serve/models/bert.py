"""BERT encoders (transformers' `BertModel`, the network of all-MiniLM-L6-v2 and most
sentence-transformers embedders): token, position and token-type embeddings summed and
layer-normed, then post-norm layers of bidirectional attention and a GELU MLP. Read
from a Hugging Face directory (config.json, model.safetensors; the weights with or
without the `bert.` prefix a pretraining checkpoint has).

A batch comes padded to its longest row, and runs packed: the products, norms and
GELUs take the real tokens only, and only the attention sees the padded layout (its
padding keys masked out). The padding rows' states come out as zeros."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mistralrs_serve import _native as native
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError

# transformers' names for the GELUs a BERT config may ask for
_GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    gelu_approximate: str  # torch's `approximate` of the MLP's GELU

    @staticmethod
    def from_hf(cfg: Mapping[str, Any]) -> BertConfig:
        act = cfg.get("hidden_act", "gelu")
        if act not in _GELU:
            raise UnsupportedModelError(f"BERT hidden_act {act!r}: one of {', '.join(sorted(_GELU))}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError("BERT position_embedding_type: only 'absolute' is supported")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        if hidden % heads:
            raise ModelLoadError(f"BERT hidden_size {hidden} is not a multiple of its {heads} heads")
        return BertConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            gelu_approximate=_GELU[act],
        )


class BertEncoder:
    """The encoder's weights (float32) and its forward over padded batches."""

    def __init__(self, config: BertConfig, weights: Mapping[str, torch.Tensor]) -> None:
        self.config = config
        w = {name.removeprefix("bert."): t for name, t in weights.items()}

        def get(name: str) -> torch.Tensor:
            t = w.get(name)
            if t is None:
                raise ModelLoadError(f"BERT weights lack {name}")
            return t.float().contiguous()

        self.word = get("embeddings.word_embeddings.weight")
        self.position = get("embeddings.position_embeddings.weight")
        self.token_type = get("embeddings.token_type_embeddings.weight")
        self.embed_norm = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self.layers = [_BertLayer(get, f"encoder.layer.{i}.", config) for i in range(config.num_layers)]
        self._local = threading.local()  # each thread's _Workspace
        if self.word.shape != (config.vocab_size, config.hidden_size):
            raise ModelLoadError(f"BERT word embeddings {tuple(self.word.shape)} against the config")

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) token ids and a (B, L) bool mask of the real tokens -> (B, L, hidden)."""
        cfg = self.config
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"{length} tokens: the model takes at most {cfg.max_position_embeddings}")
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask = attention_mask.bool()
        real = mask.reshape(-1).nonzero().squeeze(1)  # the real tokens' rows of (B * L)
        positions = torch.arange(length).expand_as(input_ids).reshape(-1)[real]
        x = self.word[input_ids.reshape(-1)[real]] + self.position[positions]
        x = x + self.token_type[types.reshape(-1)[real]]
        x = F.layer_norm(x, (cfg.hidden_size,), *self.embed_norm, cfg.layer_norm_eps)
        packing = _Packing(real, mask, self._workspace())
        for layer in self.layers:
            x = layer.forward(x, packing, cfg)
        out = x.new_zeros((mask.numel(), cfg.hidden_size))
        out[real] = x
        return out.view(*mask.shape, cfg.hidden_size)

    def _workspace(self) -> _Workspace:
        ws: _Workspace | None = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = _Workspace()
        return ws


class _Workspace:
    """Buffers a forward reuses instead of allocating: a fresh multi-megabyte tensor
    per product is a fresh mapping from the C allocator, whose page faults cost as much
    as the GELUs and norms together (batch of 32 sentences: 90 -> 75 ms here). One per
    thread; the buffers grow to the largest call seen and stay."""

    def __init__(self) -> None:
        self.flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.numel() < n:
            # zeros: a padded row read before it is written must be finite (masked keys)
            buf = self.flat[name] = torch.zeros(n)
        return buf[:n].view(shape)


class _Packing:
    """The real tokens of a padded (B, L) batch as rows of a packed (T, ...) tensor."""

    def __init__(self, real: torch.Tensor, mask: torch.Tensor, ws: _Workspace) -> None:
        self.real, self.shape, self.ws = real, mask.shape, ws
        self.keys = mask[:, None, None, :]  # (B, 1, 1, L): which keys a query sees
        # where each sequence's rows start in the packed order (a row without tokens has none)
        ends = mask.sum(1).cumsum(0)
        self.starts = torch.unique_consecutive(torch.cat([ends.new_zeros(1), ends]))

    def unpack(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """(T, C) -> (B, L, C) in the workspace; the padding rows hold finite leftovers."""
        batch, length = self.shape
        out = self.ws.take(name, batch * length, x.shape[1])
        out.index_copy_(0, self.real, x)
        return out.view(batch, length, x.shape[1])


def _layer_norm(
    x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor], eps: float, out: torch.Tensor, ws: _Workspace
) -> torch.Tensor:
    """LayerNorm over the last dimension into `out` (torch's kernel, its out= form)."""
    rows = x.shape[0]
    stats = (ws.take("ln_mean", rows, 1), ws.take("ln_rstd", rows, 1))
    torch.ops.aten.native_layer_norm.out(
        x, [x.shape[1]], norm[0], norm[1], eps, out0=out, out1=stats[0], out2=stats[1]
    )
    return out


class _BertLayer:
    def __init__(self, get: Any, p: str, cfg: BertConfig) -> None:
        att = p + "attention."
        # the attention's 1/sqrt(head_dim) folded into the query's weights and bias
        scale = (cfg.hidden_size // cfg.num_heads) ** -0.5
        q_w, q_b = get(f"{att}self.query.weight") * scale, get(f"{att}self.query.bias") * scale
        self.qkv_w = torch.cat([q_w, get(f"{att}self.key.weight"), get(f"{att}self.value.weight")]).t()
        self.qkv_b = torch.cat([q_b, get(f"{att}self.key.bias"), get(f"{att}self.value.bias")])
        self.out_w, self.out_b = get(att + "output.dense.weight").t(), get(att + "output.dense.bias")
        self.att_norm = (get(att + "output.LayerNorm.weight"), get(att + "output.LayerNorm.bias"))
        self.up_w, self.up_b = get(p + "intermediate.dense.weight").t(), get(p + "intermediate.dense.bias")
        self.down_w, self.down_b = get(p + "output.dense.weight").t(), get(p + "output.dense.bias")
        self.mlp_norm = (get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias"))

    def forward(self, x: torch.Tensor, packing: _Packing, cfg: BertConfig) -> torch.Tensor:
        """Packed (T, hidden) states -> the layer's (in the workspace), the attention over
        the padded layout."""
        ws, tokens, hidden = packing.ws, x.shape[0], x.shape[1]
        qkv = torch.addmm(self.qkv_b, x, self.qkv_w, out=ws.take("qkv", tokens, 3 * hidden))
        a = _attention(qkv, packing, cfg)
        h = torch.addmm(self.out_b, a, self.out_w, out=ws.take("attn_out", tokens, hidden))
        x = _layer_norm(h.add_(x), self.att_norm, cfg.layer_norm_eps, ws.take("x_mid", tokens, hidden), ws)
        up = torch.addmm(self.up_b, x, self.up_w, out=ws.take("up", tokens, self.up_w.shape[1]))
        torch.ops.aten.gelu_(up, approximate=cfg.gelu_approximate)
        down = torch.addmm(self.down_b, up, self.down_w, out=ws.take("down", tokens, hidden))
        return _layer_norm(
            down.add_(x), self.mlp_norm, cfg.layer_norm_eps, ws.take("x_out", tokens, hidden), ws
        )


def _attention(qkv: torch.Tensor, packing: _Packing, cfg: BertConfig) -> torch.Tensor:
    """(T, 3 * hidden) packed q, k, v -> (T, hidden) attention, each row over its own
    sequence's rows: the Rust kernel over the packed rows (no padding, no copies), or
    torch's fused attention over the padded layout where the rows are not on the CPU."""
    ws, tokens = packing.ws, qkv.shape[0]
    hidden = qkv.shape[1] // 3
    out = ws.take("ctx_rows", tokens, hidden)
    if qkv.device.type == "cpu":
        native.packed_attention(qkv.numpy(), packing.starts.numpy(), cfg.num_heads, 1.0, out.numpy())
        return out
    (batch, length), heads = packing.shape, cfg.num_heads
    padded = packing.unpack(qkv, "qkv_padded").view(batch, length, 3, heads, hidden // heads)
    q, k, v = padded.permute(2, 0, 3, 1, 4)  # each (B, H, L, D)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.keys, scale=1.0).transpose(1, 2)
    rows = ws.take("ctx_padded", batch, length, hidden)
    rows.view(batch, length, heads, hidden // heads).copy_(a)
    return torch.index_select(rows.view(batch * length, -1), 0, packing.real, out=out)


def load_bert(directory: Path) -> BertEncoder:
    """A BERT encoder from a Hugging Face directory (config.json, model.safetensors)."""
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{directory}: a BERT directory holds config.json and model.safetensors")
    cfg = json.loads(config_path.read_text())
    if cfg.get("model_type") != "bert":
        raise UnsupportedModelError(f"{directory}: model_type {cfg.get('model_type')!r} is not 'bert'")
    return BertEncoder(BertConfig.from_hf(cfg), load_file(str(weights_path)))
