"""Progress of long loads: a bar on a terminal, nothing extra in logs (the
loader logs one line with the total time)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str) -> Iterator[T]:
    """items, with a progress bar on stderr when it is a terminal."""
    yield from tqdm(items, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False)
