"""The image processors of the vision-language families: a picture into the
pixel tensor its vision encoder takes, and the number of image tokens it
becomes in the prompt. Settings come from the model directory's
`preprocessor_config.json` (the keys transformers writes), with the family's
defaults where a key is missing.

- Gemma 3 (SigLIP): a fixed square (896 x 896 by default), bilinear, rescaled
  and normalized (mean and std 0.5); `image_seq_length` (256) tokens per image.
- Qwen2-VL / Qwen2.5-VL: dynamic resolution. The picture is resized (bicubic) to
  the nearest size whose sides are multiples of patch_size x merge_size (28)
  with the pixel count inside [min_pixels, max_pixels], normalized with CLIP's
  mean and std, then cut into 14 x 14 patches, each repeated over the
  temporal patch (2), in merge-window order: (patches, 3 x 2 x 14 x 14) and the
  grid (t, h, w); (h x w) / merge_size^2 tokens per image.

The resizes are Pillow's on the 8-bit picture, then float32 arithmetic, as
transformers' processors do, so the tensors agree with theirs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mistralrs_serve.errors import ModelLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's resampling filters by the numbers transformers stores
RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: np.ndarray  # float32: (3, H, W) for Gemma 3; (patches, patch_dim) for Qwen-VL
    num_tokens: int  # placeholder tokens the image takes in the prompt
    grid_thw: tuple[int, int, int] | None = None  # Qwen-VL's patch grid


def _resize(image: Any, width: int, height: int, resample: int) -> np.ndarray:
    from PIL import Image

    name = RESAMPLE.get(resample)
    if name is None:
        raise ModelLoadError(f"image processor: resample {resample} is not a Pillow filter")
    resized = image.resize((width, height), resample=getattr(Image.Resampling, name))
    return np.asarray(resized, dtype=np.uint8)


def _normalize(pixels: np.ndarray, scale: float, mean: Any, std: Any) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32: rescaled, then (x - mean) / std per channel."""
    x = pixels.astype(np.float32) * np.float32(scale)
    y = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(y.transpose(2, 0, 1), dtype=np.float32)


class Gemma3ImageProcessor:
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        size = cfg.get("size") or {}
        self.height = int(size.get("height", 896))
        self.width = int(size.get("width", 896))
        self.resample = int(cfg.get("resample", 2))
        self.scale = float(cfg.get("rescale_factor", 1 / 255))
        self.mean = cfg.get("image_mean", [0.5, 0.5, 0.5])
        self.std = cfg.get("image_std", [0.5, 0.5, 0.5])
        self.tokens = int(cfg.get("image_seq_length", cfg.get("mm_tokens_per_image", 256)))
        if cfg.get("do_pan_and_scan"):
            raise ModelLoadError("Gemma 3 image processor: pan and scan is not supported")

    def __call__(self, image: Any) -> ProcessedImage:
        pixels = _resize(image.convert("RGB"), self.width, self.height, self.resample)
        return ProcessedImage(_normalize(pixels, self.scale, self.mean, self.std), self.tokens)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size nearest (height, width) with both sides multiples of `factor` and the pixel
    count within [min_pixels, max_pixels] (Qwen-VL's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height} is too narrow (aspect ratio over 200)")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class QwenVLImageProcessor:
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        size = cfg.get("size") or {}
        self.patch = int(cfg.get("patch_size", 14))
        self.merge = int(cfg.get("merge_size", 2))
        self.temporal = int(cfg.get("temporal_patch_size", 2))
        self.min_pixels = int(cfg.get("min_pixels") or size.get("shortest_edge", 56 * 56))
        self.max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280))
        self.resample = int(cfg.get("resample", 3))
        self.scale = float(cfg.get("rescale_factor", 1 / 255))
        self.mean = cfg.get("image_mean", CLIP_MEAN)
        self.std = cfg.get("image_std", CLIP_STD)

    def __call__(self, image: Any) -> ProcessedImage:
        image = image.convert("RGB")
        width, height = image.size
        factor = self.patch * self.merge
        h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        x = _normalize(_resize(image, w, h, self.resample), self.scale, self.mean, self.std)
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        patches = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        flat = np.ascontiguousarray(patches.reshape(gh * gw, 3 * t * p * p), dtype=np.float32)
        return ProcessedImage(flat, gh * gw // (m * m), (1, gh, gw))


def image_processor(family: str, cfg: Mapping[str, Any]) -> Gemma3ImageProcessor | QwenVLImageProcessor:
    """The processor of a vision family ("gemma3", "qwen2_5_vl", "qwen2_vl")."""
    if family == "gemma3":
        return Gemma3ImageProcessor(cfg)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return QwenVLImageProcessor(cfg)
    raise ModelLoadError(f"no image processor for the family {family!r}")
