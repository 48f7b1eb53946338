"""Prompts with images through the whole chat path against transformers, on tiny
random Gemma 3 and Qwen2.5-VL checkpoints (tiny_vlms.py) loaded from their saved
directories, fp32: chat messages with image_url parts (data URLs) rendered by
ChatServing, their images encoded and placed, then run by the engine over the
paged cache. The logits of the prompt's last token and of the first generated
token equal transformers' (max abs diff <= 1e-4) with one image, with three
images over two user messages, in small chunks (a Gemma 3 image is never cut;
a Qwen one may be), from the prefix cache, and batched with a text-only
request. Prompts that differ only in their image do not share cached blocks."""

from __future__ import annotations

import base64
import io
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_vlms
import torch
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.engine_info import CheckedPrompt
from mistralrs_serve.engine.llm_engine import LLMEngine
from mistralrs_serve.entrypoints.openai.protocol import ChatCompletionRequest
from mistralrs_serve.entrypoints.openai.serving_chat import ChatServing
from mistralrs_serve.errors import InvalidRequestError
from mistralrs_serve.models.loader import LoadedModel, ModelSource, load_model
from PIL import Image
from test_image_inputs import picture

TOL = 1e-4


class Family:
    """A tiny checkpoint as we load it from `source`, and transformers' model of it."""

    def __init__(self, name: str, source: ModelSource, hf: Any) -> None:
        self.name, self.hf = name, hf
        self.loaded: LoadedModel = load_model(source, dtype=torch.float32)
        assert self.loaded.vision is not None
        self.vision = self.loaded.vision

    def engine(self, **config: Any) -> LLMEngine:
        settings = dict(device="cpu", kv_cache_mb=4, block_size=8, max_num_batched_tokens=512) | config
        return LLMEngine(self.loaded, EngineConfig(**settings))

    def prompt(self, engine: LLMEngine, messages: list[dict[str, Any]], max_tokens: int = 2) -> CheckedPrompt:
        serving = ChatServing(types.SimpleNamespace(info=engine.info), "tiny")  # type: ignore[arg-type]
        req = ChatCompletionRequest(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
        return serving.prepare(req).prompt

    def reference(self, ids: list[int], pictures: list[Image.Image]) -> torch.Tensor:
        """transformers' logits of the last token of `ids` with `pictures` in order."""
        processed = [self.vision.processor(p) for p in pictures]
        image_id = self.vision.image_token_id
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            if self.name == "gemma3":
                pixels = torch.from_numpy(np.stack([p.pixel_values for p in processed]))
                out = self.hf(
                    input_ids=input_ids, pixel_values=pixels, token_type_ids=(input_ids == image_id).long()
                )
            else:
                pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in processed]))
                out = self.hf(
                    input_ids=input_ids,
                    pixel_values=pixels,
                    image_grid_thw=torch.tensor([p.grid_thw for p in processed]),
                    mm_token_type_ids=(input_ids == image_id).int(),
                )
        return out.logits[0, -1]


BUILDERS: dict[str, Callable[[Path], Any]] = {"gemma3": tiny_vlms.gemma3, "qwen_vl": tiny_vlms.qwen_vl}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    directory = tmp_path_factory.mktemp(request.param)
    hf = BUILDERS[request.param](directory)
    return Family(request.param, ModelSource.parse(str(directory)), hf)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(image: Image.Image) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(image), "detail": "auto"}}


RED, WIDE, TALL = picture(80, 60, seed=1), picture(150, 70, seed=2), picture(50, 110, seed=3)
ONE = [{"role": "user", "content": [{"type": "text", "text": "what is in the picture?"}, image_part(RED)]}]
THREE = [
    {"role": "user", "content": [image_part(WIDE), {"type": "text", "text": "and"}, image_part(TALL)]},
    {"role": "assistant", "content": "two pictures"},
    {"role": "user", "content": [{"type": "text", "text": "now this one"}, image_part(RED)]},
]


def run(engine: LLMEngine, prompts: dict[str, CheckedPrompt]) -> dict[str, list[torch.Tensor]]:
    """Each request's logits rows, one per sampled step, with the requests running together."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in prompts}
    execute = engine.runner.execute
    by_seq: dict[int, str] = {}

    def capture(plan: Any, media: Any = None) -> torch.Tensor:
        logits = execute(plan, media)
        for row, seq_id in enumerate(plan.sampled_seq_ids.tolist()):
            rows[by_seq[seq_id]].append(logits[row].clone())
        return logits

    engine.runner.execute = capture  # type: ignore[method-assign]
    for name, prompt in prompts.items():
        req = engine.add_checked(name, prompt, lambda out: None)
        by_seq[req.seq_ids[0]] = name
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.runner.execute = execute  # type: ignore[method-assign]
    return rows


def check(
    family: Family, prompt: CheckedPrompt, got: list[torch.Tensor], pictures: list[Image.Image]
) -> None:
    """The prompt's last logits, then the first generated token's, against transformers."""
    ids = prompt.prompt_ids
    assert (got[0] - family.reference(ids, pictures)).abs().max().item() <= TOL
    following = [*ids, int(got[0].argmax())]
    assert (got[1] - family.reference(following, pictures)).abs().max().item() <= TOL


@pytest.mark.parametrize(
    ("messages", "pictures"), [(ONE, [RED]), (THREE, [WIDE, TALL, RED])], ids=["one", "three"]
)
def test_logits_match_transformers(family: Family, messages: list[Any], pictures: list[Image.Image]) -> None:
    engine = family.engine()
    prompt = family.prompt(engine, messages)
    assert prompt.media is not None and len(prompt.media.images) == len(pictures)
    image_id = family.vision.image_token_id
    assert sum(1 for t in prompt.prompt_ids if t == image_id) == sum(
        len(im.embeddings) for im in prompt.media.images
    )
    check(family, prompt, run(engine, {"r": prompt})["r"], pictures)


def test_small_chunks_and_the_prefix_cache(family: Family) -> None:
    """Chunks of at most 24 tokens; then the same prompt again, most of it from the cache."""
    engine = family.engine(max_num_batched_tokens=24)
    prompt = family.prompt(engine, THREE)
    first = run(engine, {"a": prompt})["a"]
    check(family, prompt, first, [WIDE, TALL, RED])
    hits = engine.scheduler.prefix_cache_hits
    again = run(engine, {"b": prompt})["b"]
    assert engine.scheduler.prefix_cache_hits > hits
    assert (again[0] - first[0]).abs().max().item() <= 1e-5


def test_another_image_is_not_served_from_the_cache(family: Family) -> None:
    engine = family.engine()
    run(engine, {"a": family.prompt(engine, ONE)})
    same_size = picture(80, 60, seed=9)  # the same token count, other pixels
    other = [{"role": "user", "content": [ONE[0]["content"][0], image_part(same_size)]}]
    prompt = family.prompt(engine, other)
    hits = engine.scheduler.prefix_cache_hits
    got = run(engine, {"b": prompt})["b"]
    image_start = prompt.media.images[0].start if prompt.media is not None else 0
    assert engine.scheduler.prefix_cache_hits - hits <= image_start
    check(family, prompt, got, [same_size])


def test_batched_with_a_text_only_request(family: Family) -> None:
    engine = family.engine()
    with_image = family.prompt(engine, ONE)
    text = family.prompt(engine, [{"role": "user", "content": "no pictures here, only words"}])
    together = run(engine, {"image": with_image, "text": text})
    check(family, with_image, together["image"], [RED])
    alone = run(family.engine(), {"text": text})["text"]
    assert (together["text"][0] - alone[0]).abs().max().item() <= 1e-5


def test_marker_text_in_a_part_is_refused(family: Family) -> None:
    engine = family.engine()
    marker = family.vision.marker
    messages = [{"role": "user", "content": [{"type": "text", "text": f"see {marker}"}, image_part(RED)]}]
    with pytest.raises(InvalidRequestError, match="image markers"):
        family.prompt(engine, messages)


def test_the_triton_path(family: Family) -> None:
    """The Triton kernels (Triton's interpreter here, as conftest sets): a step with a
    bidirectional image takes SDPA prefills beside the kernels' decodes."""
    engine = family.engine(triton=True, max_num_batched_tokens=24)
    prompt = family.prompt(engine, THREE)
    text = family.prompt(engine, [{"role": "user", "content": "plain words"}])
    check(family, prompt, run(engine, {"image": prompt, "text": text})["image"], [WIDE, TALL, RED])
