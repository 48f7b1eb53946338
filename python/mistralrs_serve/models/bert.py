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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

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
        self.layers = [_BertLayer(get, f"encoder.layer.{i}.") for i in range(config.num_layers)]
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
        packing = _Packing(real, mask)
        for layer in self.layers:
            x = layer.forward(x, packing, cfg)
        return packing.unpack(x)


class _Packing:
    """The real tokens of a padded (B, L) batch as rows of a packed (T, ...) tensor."""

    def __init__(self, real: torch.Tensor, mask: torch.Tensor) -> None:
        self.real, self.shape = real, mask.shape
        self.keys = mask[:, None, None, :]  # (B, 1, 1, L): which keys a query sees

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, L, ...), zeros at the padding."""
        batch, length = self.shape
        out = x.new_zeros((batch * length, *x.shape[1:]))
        out[self.real] = x
        return out.view(batch, length, *x.shape[1:])


class _BertLayer:
    def __init__(self, get: Any, p: str) -> None:
        att = p + "attention."
        self.qkv_w = torch.cat([get(f"{att}self.{n}.weight") for n in ("query", "key", "value")])
        self.qkv_b = torch.cat([get(f"{att}self.{n}.bias") for n in ("query", "key", "value")])
        self.out = (get(att + "output.dense.weight"), get(att + "output.dense.bias"))
        self.att_norm = (get(att + "output.LayerNorm.weight"), get(att + "output.LayerNorm.bias"))
        self.up = (get(p + "intermediate.dense.weight"), get(p + "intermediate.dense.bias"))
        self.down = (get(p + "output.dense.weight"), get(p + "output.dense.bias"))
        self.mlp_norm = (get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias"))

    def forward(self, x: torch.Tensor, packing: _Packing, cfg: BertConfig) -> torch.Tensor:
        """Packed (T, hidden) states -> the layer's, the attention over the padded layout."""
        hidden, heads = x.shape[1], cfg.num_heads
        (batch, length), head_dim = packing.shape, hidden // heads
        qkv = packing.unpack(F.linear(x, self.qkv_w, self.qkv_b)).view(batch, length, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, head_dim)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.keys)
        a = a.transpose(1, 2).reshape(batch * length, hidden)[packing.real]
        x = F.layer_norm(F.linear(a, *self.out) + x, (hidden,), *self.att_norm, cfg.layer_norm_eps)
        h = F.gelu(F.linear(x, *self.up), approximate=cfg.gelu_approximate)
        return F.layer_norm(F.linear(h, *self.down) + x, (hidden,), *self.mlp_norm, cfg.layer_norm_eps)


def load_bert(directory: Path) -> BertEncoder:
    """A BERT encoder from a Hugging Face directory (config.json, model.safetensors)."""
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{directory}: a BERT directory holds config.json and model.safetensors")
    cfg = json.loads(config_path.read_text())
    if cfg.get("model_type") != "bert":
        raise UnsupportedModelError(f"{directory}: model_type {cfg.get('model_type')!r} is not 'bert'")
    return BertEncoder(BertConfig.from_hf(cfg), load_file(str(weights_path)))
