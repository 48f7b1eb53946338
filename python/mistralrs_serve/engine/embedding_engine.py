"""The embedding model's engine: one thread that batches the rows of every
request waiting into the same forward calls (a request of one sentence that
arrives while another of 32 waits rides along with it), and hands each
request its own rows back.

Rows arrive checked and cut to the model's limit (serving_embedding.py), so
the batch never fails for one request's input; an exception fails every
request of that batch."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np

logger = logging.getLogger("mistralrs_serve.embedding")

MAX_BATCH_ROWS = 4096  # rows of several requests gathered into one run at most


class Embedder(Protocol):
    """What the engine runs: `models/sentence_embedder.SentenceEmbedder` and its decoder twin."""

    dim: int
    max_seq_length: int

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]: ...

    def vectors(self, rows: Sequence[Sequence[int]]) -> np.ndarray: ...


@dataclass
class _Job:
    rows: list[list[int]]
    future: Future[np.ndarray]


class EmbeddingEngine:
    def __init__(self, embedder: Embedder, name: str) -> None:
        self.embedder = embedder
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"embed-{name}", daemon=True)
        self._thread.start()

    def submit(self, rows: list[list[int]]) -> Future[np.ndarray]:
        """The (rows, dim) float32 vectors of `rows`, when their batch has run."""
        future: Future[np.ndarray] = Future()
        self._jobs.put(_Job(rows, future))
        return future

    def shutdown(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            rows = len(job.rows)
            while rows < MAX_BATCH_ROWS:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                batch.append(more)
                rows += len(more.rows)
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            out = self.embedder.vectors([row for j in jobs for row in j.rows])
        except Exception as e:
            logger.exception("an embedding batch failed")
            for j in jobs:
                j.future.set_exception(e)
            return
        start = 0
        for j in jobs:
            j.future.set_result(out[start : start + len(j.rows)])
            start += len(j.rows)
