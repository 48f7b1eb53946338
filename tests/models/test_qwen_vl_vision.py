"""Qwen2.5-VL's vision encoder (models/qwen_vl_vision.py) against transformers'
Qwen2_5_VLForConditionalGeneration on tiny random weights built here and loaded
from the saved directory, fp32: the merged image embeddings of several pictures
of different sizes in one call (windowed and full-attention blocks, windows that
do not divide the grid), each processed by our Qwen-VL image processor (equal to
transformers', see tests/models/test_image_inputs.py). The text model of the same
directory gives transformers' logits on a prompt without images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import tiny_vlms
import torch
from mistralrs_serve.images.processors import QwenVLImageProcessor
from mistralrs_serve.models.qwen_vl_vision import load_qwen_vl_vision, window_order
from test_image_inputs import picture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    directory = tmp_path_factory.mktemp("qwen-vl")
    return tiny_vlms.qwen_vl(directory), directory


def test_image_embeddings_match_transformers(tiny: tuple[Any, Path]) -> None:
    hf, directory = tiny
    ours = load_qwen_vl_vision(directory)
    processor = QwenVLImageProcessor({"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64})
    images = [processor(picture(w, h, seed=w)) for w, h in [(150, 100), (60, 200), (56, 56)]]
    grids = [im.grid_thw for im in images if im.grid_thw is not None]
    pixels = torch.from_numpy(np.concatenate([im.pixel_values for im in images]))
    got = ours.encode(pixels, grids)
    with torch.no_grad():
        want = hf.model.get_image_features(pixels, torch.tensor(grids)).pooler_output
    assert [g.shape[0] for g in got] == [im.num_tokens for im in images] == [w.shape[0] for w in want]
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max().item() <= 1e-4
    alone = ours.encode(torch.from_numpy(images[1].pixel_values), grids[1:2])[0]
    assert (alone - got[1]).abs().max().item() <= 1e-5


def test_window_order_groups_each_window() -> None:
    # one image of 8 x 6 patches: 4 x 3 merge groups in windows of 2 x 2 groups
    order, bounds = window_order([(1, 8, 6)], merge=2, window=2)
    assert sorted(order.tolist()) == list(range(12))
    assert order[:4].tolist() == [0, 1, 3, 4] and bounds[:3] == [0, 16, 24]


def test_the_text_model_loads_from_the_vision_checkpoint(tiny: tuple[Any, Path]) -> None:
    """Multimodal rotary positions reduce to plain ones on text: the Qwen2 network gives
    transformers' logits."""
    hf, directory = tiny
    tm.assert_text_model_matches(hf, directory)
