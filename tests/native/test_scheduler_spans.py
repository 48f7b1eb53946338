"""The scheduler binding's content spans: prompts with the same ids and other
images (keys) do not share prefix-cache blocks past the image's start; bad spans
are ValueErrors."""

from __future__ import annotations

import numpy as np
import pytest
from mistralrs_serve import _native as native

PROMPT = np.array([1, 2, 3, 4, 5, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6], dtype=np.uint32)


def hits(first_key: int, second_key: int | None) -> int:
    scheduler = native.Scheduler(num_blocks=32, block_size=4)
    scheduler.add(1, PROMPT, spans=[(5, 9, first_key)])
    scheduler.schedule()
    scheduler.finish(1)
    scheduler.add(2, PROMPT, spans=None if second_key is None else [(5, 9, second_key)])
    scheduler.schedule()
    return scheduler.prefix_cache_hits


def test_other_images_do_not_share_blocks() -> None:
    key = 0xDEADBEEF_12345678
    assert hits(key, key) == 12
    assert hits(key, key + 1) == 4  # the block before the image only
    assert hits(key, None) == 4


@pytest.mark.parametrize("span", [(3, 3, 1), (5, 2, 1), (0, 17, 1)])
def test_bad_spans_are_value_errors(span: tuple[int, int, int]) -> None:
    scheduler = native.Scheduler(num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="span"):
        scheduler.add(1, PROMPT, spans=[span])
