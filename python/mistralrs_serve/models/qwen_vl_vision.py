"""Qwen2.5-VL's vision encoder: the processor's patches (14 x 14 pixels over two
frames, in merge-window order; images/processors.py) through a 3-D patch
convolution, transformer blocks with 2-D rotary positions (row and column of
each patch) and bidirectional attention, windowed (112-pixel windows) except in
the `fullatt_block_indexes` blocks, then the merger: each 2 x 2 group of patches
normed, concatenated and projected by a GELU MLP into the text model's width.
One merged token per 2 x 2 patches is what stands in for an image placeholder.

The blocks run in window order (the merge groups of one window together); the
merged tokens are put back in the image's row-major order at the end. Images of
one call attend only within themselves. Float32, torch. Loaded from a
Qwen2_5_VLForConditionalGeneration directory (`visual.` weights, or
`model.visual.` as transformers 5 saves them)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models.siglip import weight_getter

EPS = 1e-6


@dataclass(frozen=True)
class QwenVisionConfig:
    hidden_size: int
    num_heads: int
    depth: int
    patch_size: int
    temporal_patch_size: int
    merge: int
    window_size: int
    full_attention: tuple[int, ...]
    out_hidden_size: int
    rope_theta: float

    @staticmethod
    def from_hf(cfg: Mapping[str, Any]) -> QwenVisionConfig:
        rope = cfg.get("rope_parameters") or {}
        return QwenVisionConfig(
            hidden_size=int(cfg["hidden_size"]),
            num_heads=int(cfg["num_heads"]),
            depth=int(cfg["depth"]),
            patch_size=int(cfg.get("patch_size", 14)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            merge=int(cfg.get("spatial_merge_size", 2)),
            window_size=int(cfg.get("window_size", 112)),
            full_attention=tuple(int(i) for i in cfg.get("fullatt_block_indexes", ())),
            out_hidden_size=int(cfg["out_hidden_size"]),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def patch_positions(grids: Sequence[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(patches, 2): each patch's (row, column), in the processor's merge-window order."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        pos = [
            p.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
            for p in (rows, cols)
        ]
        out.append(torch.stack(pos, -1).repeat(t, 1))
    return torch.cat(out)


def window_order(
    grids: Sequence[tuple[int, int, int]], merge: int, window: int
) -> tuple[torch.Tensor, list[int]]:
    """The merge groups in window order (each window's groups together, windows
    row-major), and the windows' bounds in patches (cumulative, from 0)."""
    order, bounds, offset = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = window - gh % window, window - gw % window
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
        windows = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        for win in windows:
            groups = win[win >= 0]
            if groups.numel():
                order.append(groups + offset)
                bounds.append(bounds[-1] + groups.numel() * merge * merge)
        offset += t * gh * gw
    return torch.cat(order), bounds


class QwenVLVisionEncoder:
    def __init__(self, config: QwenVisionConfig, weights: Mapping[str, torch.Tensor]) -> None:
        self.config = config
        get = weight_getter(weights, "visual.")
        self.patch = get("patch_embed.proj.weight")  # (hidden, 3, T, P, P), no bias
        self.blocks: list[dict[str, Any]] = []
        for i in range(config.depth):
            p = f"blocks.{i}."
            self.blocks.append(
                {
                    "norm1": get(p + "norm1.weight"),
                    "qkv": (get(p + "attn.qkv.weight"), get(p + "attn.qkv.bias")),
                    "proj": (get(p + "attn.proj.weight"), get(p + "attn.proj.bias")),
                    "norm2": get(p + "norm2.weight"),
                    "gate": (get(p + "mlp.gate_proj.weight"), get(p + "mlp.gate_proj.bias")),
                    "up": (get(p + "mlp.up_proj.weight"), get(p + "mlp.up_proj.bias")),
                    "down": (get(p + "mlp.down_proj.weight"), get(p + "mlp.down_proj.bias")),
                }
            )
        self.merge_norm = get("merger.ln_q.weight")
        self.merge_fc1 = (get("merger.mlp.0.weight"), get("merger.mlp.0.bias"))
        self.merge_fc2 = (get("merger.mlp.2.weight"), get("merger.mlp.2.bias"))
        head_dim = config.hidden_size // config.num_heads
        quarter = head_dim // 2
        self.inv_freq = 1.0 / config.rope_theta ** (
            torch.arange(0, quarter, 2, dtype=torch.float32) / quarter
        )

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """(patches, 3 T P P) processor output of the images whose grids are `grids`
        -> per image its (h w / merge^2, text hidden) embeddings."""
        cfg = self.config
        unit = cfg.merge * cfg.merge
        total = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != total:
            raise ValueError(f"{pixel_values.shape[0]} patches for grids holding {total}")
        kernel = self.patch.shape[2:]
        x = F.conv3d(pixel_values.float().view(-1, 3, *kernel), self.patch, stride=kernel).view(total, -1)
        order, window_bounds = window_order(grids, cfg.merge, cfg.window_size // cfg.merge // cfg.patch_size)

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.view(total // unit, unit, -1)[order].reshape(total, -1)

        x = by_window(x)
        pos = patch_positions(grids, cfg.merge).float()
        freqs = by_window(torch.cat([pos[:, :1] * self.inv_freq, pos[:, 1:] * self.inv_freq], -1))
        angles = torch.cat([freqs, freqs], -1)[:, None]  # (patches, 1, head_dim)
        cos, sin = angles.cos(), angles.sin()
        image_bounds = [0]
        for t, h, w in grids:
            image_bounds.append(image_bounds[-1] + t * h * w)
        for i, block in enumerate(self.blocks):
            bounds = image_bounds if i in cfg.full_attention else window_bounds
            x = x + self._attention(_rms(x, block["norm1"]), block, cos, sin, bounds)
            normed = _rms(x, block["norm2"])
            mlp = F.silu(F.linear(normed, *block["gate"])) * F.linear(normed, *block["up"])
            x = x + F.linear(mlp, *block["down"])
        merged = _rms(x, self.merge_norm).view(total // unit, -1)
        merged = F.linear(F.gelu(F.linear(merged, *self.merge_fc1)), *self.merge_fc2)
        merged = merged[torch.argsort(order)]
        return list(merged.split([t * h * w // unit for t, h, w in grids]))

    def _attention(
        self, h: torch.Tensor, block: dict[str, Any], cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]
    ) -> torch.Tensor:
        n, hidden = h.shape
        heads = self.config.num_heads
        q, k, v = F.linear(h, *block["qkv"]).view(n, 3, heads, hidden // heads).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = torch.empty_like(h)
        for start, end in itertools.pairwise(bounds):
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, dim)
            out[start:end] = (
                F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1).reshape(end - start, hidden)
            )
        return F.linear(out, *block["proj"])


def load_qwen_vl_vision(directory: Path) -> QwenVLVisionEncoder:
    from mistralrs_serve.models.hf_loader import load_safetensors

    cfg = json.loads((directory / "config.json").read_text())
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict):
        raise ModelLoadError(f"{directory}: config.json has no vision_config (a text-only checkpoint)")
    return QwenVLVisionEncoder(QwenVisionConfig.from_hf(vision), load_safetensors(directory, torch.float32))
