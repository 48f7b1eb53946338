"""The scheduler binding's content spans: prompts with the same ids and other
images (keys) do not share prefix-cache blocks past the image's start; a whole
span is never cut between chunks; bad spans are ValueErrors."""

from __future__ import annotations

import numpy as np
import pytest
from mistralrs_serve import _native as native

PROMPT = np.array([1, 2, 3, 4, 5, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6], dtype=np.uint32)


def hits(first_key: int, second_key: int | None) -> int:
    scheduler = native.Scheduler(num_blocks=32, block_size=4)
    scheduler.add(1, PROMPT, spans=[(5, 9, first_key, False)])
    scheduler.schedule()
    scheduler.finish(1)
    scheduler.add(2, PROMPT, spans=None if second_key is None else [(5, 9, second_key, False)])
    scheduler.schedule()
    return scheduler.prefix_cache_hits


def test_other_images_do_not_share_blocks() -> None:
    key = 0xDEADBEEF_12345678
    assert hits(key, key) == 12
    assert hits(key, key + 1) == 4  # the block before the image only
    assert hits(key, None) == 4


def test_a_whole_span_is_one_chunk() -> None:
    scheduler = native.Scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=7)
    scheduler.add(1, PROMPT, spans=[(5, 9, 1, True)])
    lens = [int(scheduler.schedule().query_lens[0]) for _ in range(3)]
    assert lens == [5, 7, 4]  # 7 would cut the image at 7: the first chunk stops at its start


@pytest.mark.parametrize("span", [(3, 3, 1, False), (5, 2, 1, False), (0, 17, 1, False), (0, 9, 1, True)])
def test_bad_spans_are_value_errors(span: tuple[int, int, int, bool]) -> None:
    scheduler = native.Scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="span"):
        scheduler.add(1, PROMPT, spans=[span])
