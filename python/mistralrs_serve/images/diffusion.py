"""Image generation with a diffusers pipeline loaded from a local diffusers
directory (`model_index.json` and a folder per component): FLUX, Stable
Diffusion 1.5, SDXL, or any other text-to-image pipeline diffusers knows.

One pipeline runs one request at a time (the caller's executor sees to that);
a request's `n` images are one batched call. The pipeline's own progress bar
shows on a terminal. Sizes must be multiples of the pipeline's factor: the
VAE's scale times the transformer's 2x2 patches for FLUX-like pipelines, and 8
for UNet pipelines (what diffusers checks)."""

from __future__ import annotations

import io
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mistralrs_serve.errors import InvalidRequestError, ModelLoadError

MAX_N = 10  # OpenAI's limit on images per request
# diffusers builds a pipeline's modules under a process-wide "empty weights" patch of
# torch (accelerate's init_empty_weights): two pipelines loading at once on two
# threads see each other's meta tensors, so loads take turns
_LOADING = threading.Lock()


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    n: int
    width: int
    height: int
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


class DiffusionModel:
    def __init__(
        self,
        directory: Path,
        dtype: str = "float32",
        max_pixels: int = 2048 * 2048,
        default_steps: int | None = None,
        max_steps: int = 200,
    ) -> None:
        if not (directory / "model_index.json").is_file():
            raise ModelLoadError(f"{directory}: not a diffusers pipeline directory (no model_index.json)")
        from diffusers import DiffusionPipeline

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            dtype
        )
        if torch_dtype is None:
            raise ModelLoadError(f"image model dtype {dtype!r}: float32, bfloat16 or float16")
        try:
            with _LOADING:
                self.pipe = DiffusionPipeline.from_pretrained(str(directory), dtype=torch_dtype)
        except (OSError, ValueError, TypeError) as e:
            raise ModelLoadError(f"{directory}: the diffusers pipeline did not load: {e}") from e
        if torch.cuda.is_available():
            self.pipe.to("cuda")
        self.pipe.set_progress_bar_config(disable=not sys.stderr.isatty())
        self.kind = type(self.pipe).__name__
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        self.factor = scale * 2 if hasattr(self.pipe, "transformer") else max(8, scale)
        self.max_pixels, self.default_steps, self.max_steps = max_pixels, default_steps, max_steps

    def check(self, o: GenerateOptions) -> None:
        if not o.prompt.strip():
            raise InvalidRequestError("prompt is empty", "prompt")
        if not 1 <= o.n <= MAX_N:
            raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {o.n}", "n")
        for name, value in (("width", o.width), ("height", o.height)):
            if value <= 0 or value % self.factor:
                raise InvalidRequestError(
                    f"{name} must be a positive multiple of {self.factor} for this {self.kind}, got {value}",
                    name,
                )
        if o.width * o.height > self.max_pixels:
            raise InvalidRequestError(
                f"{o.width}x{o.height} is over this model's {self.max_pixels} pixels per image", "size"
            )
        if o.steps is not None and not 1 <= o.steps <= self.max_steps:
            raise InvalidRequestError(f"steps must be in [1, {self.max_steps}], got {o.steps}", "steps")
        if o.guidance_scale is not None and not 0.0 <= o.guidance_scale <= 100.0:
            raise InvalidRequestError(
                f"guidance_scale must be in [0, 100], got {o.guidance_scale}", "guidance_scale"
            )

    def generate(self, o: GenerateOptions) -> list[bytes]:
        """`o.n` PNG files."""
        self.check(o)
        kwargs: dict[str, Any] = {
            "prompt": o.prompt,
            "num_images_per_prompt": o.n,
            "width": o.width,
            "height": o.height,
            "output_type": "pil",
        }
        steps = o.steps or self.default_steps
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if o.guidance_scale is not None:
            kwargs["guidance_scale"] = o.guidance_scale
        if o.seed is not None:
            kwargs["generator"] = torch.Generator(device=self.pipe.device).manual_seed(o.seed)
        with torch.inference_mode():
            images = self.pipe(**kwargs).images
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
