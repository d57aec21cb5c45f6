"""The encoder interface every part of xmodal codes against.

An `Embedder` turns decoded media into vectors of one shared space: every method returns
`(n, dim)` float32 rows, L2-normalized, so an inner product is the cosine. The trained model
(`engine.model.AlignedModel`) implements it; tests use small stand-ins with the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

MODALITIES = ("image", "speech", "text")


@dataclass(frozen=True)
class SpeechEmbedding:
    """Vectors for a batch of clips, with what the transcriber heard in each."""

    vectors: np.ndarray  # (n, dim) float32, L2-normalized
    transcripts: list[str]  # one per clip, "" where nothing was recognized


class Embedder(Protocol):
    """What the indexer and the search engine need from a model.

    A model may also have `hub_penalty(vectors, modality) -> (n, 2) float32 | None`: what to
    subtract from the cosines of candidates of `modality` for text/speech and for image queries
    (hubness correction, `engine.hubness`). The indexer stores it per item; without it, search
    uses plain cosines.
    """

    name: str  # shown to users
    dim: int  # width of the shared space
    fingerprint: str  # changes whenever the vectors a model makes would change

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """`(n, dim)` float32, L2-normalized; texts must be non-empty strings."""
        ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """`(n, dim)` float32, L2-normalized, for decoded RGB images of any size."""
        ...

    def embed_speech(self, clips: Sequence[np.ndarray]) -> SpeechEmbedding:
        """Vectors and transcripts for mono float32 waveforms at `engine.media.SAMPLE_RATE`."""
        ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length as float32; an all-zero row stays zero, never NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)
