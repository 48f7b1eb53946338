"""Stop strings over a stream of text deltas, with hold-back of any tail
that could still grow into a stop string.

A thin wrapper over the Rust `_native.StopMatcher` (native/core/src/stop.rs).
The stop string that wins is the one that ends first in the text (then the
longest, then the first listed), so the result does not depend on how the
text is split into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

from mistralrs_serve._native import StopMatcher


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        # No stop strings: text passes straight through, no native object.
        self._native = StopMatcher(self.stops) if self.stops else None
        self.matched: str | None = None  # the stop string that matched, once one has

    def push(self, delta: str) -> str:
        """Add decoded text; return what may be released now ("" once a stop string matched)."""
        if self._native is None:
            return delta
        release, index = self._native.push(delta)
        if index is not None:
            self.matched = self.stops[index]
        return release

    def flush(self) -> str:
        """Release the held-back text at the end of generation."""
        return "" if self._native is None else self._native.flush()
