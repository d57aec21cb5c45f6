"""Encoding segments into vectors through an `Embedder`, in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.embedder import Embedder

BATCH_SIZE = 32  # segments per embedder call
# text goes to the embedder this many batches at a time: the text tower sorts them by length
# before batching, and more texts to sort means less padding
TEXT_BATCHES = 8


def call_size(modality: str, batch_size: int) -> int:
    """Segments of `modality` per embedder call."""
    return batch_size * TEXT_BATCHES if modality == "text" else batch_size


@dataclass(frozen=True)
class Encoded:
    """Vectors for a list of segments of one modality."""

    vectors: np.ndarray  # (n, dim) float32, L2-normalized
    transcripts: list[str] | None  # speech only: what was heard in each segment


class Mapper:
    """Calls the embedder of one modality in batches of `batch_size` (text: `call_size`)."""

    def __init__(self, embedder: Embedder, *, batch_size: int = BATCH_SIZE) -> None:
        self.embedder = embedder
        self.batch_size = batch_size

    def __call__(self, modality: str, payloads: Sequence[Any]) -> Encoded:
        """Vectors `(n, dim)` float32, L2-normalized, for `payloads` of `modality`."""
        vectors: list[np.ndarray] = []
        transcripts: list[str] = []
        step = call_size(modality, self.batch_size)
        for i in range(0, len(payloads), step):
            batch = list(payloads[i : i + step])
            if modality == "speech":
                out = self.embedder.embed_speech(batch)
                vectors.append(out.vectors)
                transcripts.extend(out.transcripts)
            elif modality == "image":
                vectors.append(self.embedder.embed_images(batch))
            else:
                vectors.append(self.embedder.embed_text(batch))
        dim = self.embedder.dim
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        stacked = np.ascontiguousarray(stacked, dtype=np.float32)
        if stacked.shape != (len(payloads), dim):
            raise ValueError(
                f"embedder {self.embedder.name!r} returned shape {stacked.shape} for "
                f"{len(payloads)} {modality} inputs; expected ({len(payloads)}, {dim})"
            )
        return Encoded(stacked, transcripts if modality == "speech" else None)
