"""Stop strings over a stream of text deltas, with hold-back of any tail
that could still grow into a stop string."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""  # text held back: a suffix that is a prefix of a stop string
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """Add decoded text; return what may be released now."""
        if self.matched is not None or not self.stops:
            return "" if self.matched is not None else delta
        text = self.pending + delta
        hit = min(((text.find(s), s) for s in self.stops if s in text), default=None)
        if hit is not None:
            self.matched, self.pending = hit[1], ""
            return text[: hit[0]]
        keep = self._longest_partial(text)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _longest_partial(self, text: str) -> int:
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
