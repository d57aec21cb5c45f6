"""Hubness correction: candidates that sit close to every query are pushed down.

In a learned space some items ("hubs") are near many queries and win top ranks they do not
deserve, while others are hardly ever found. A model bundle may carry two banks of typical
queries from its training data: caption vectors (how text and speech queries look) and photo
vectors (how image queries look). A candidate `c` is then scored against a query of kind `q`
as

    score = cos(query, c) − β · (h_q(c) − center_q),   h_q(c) = τ · log mean_b exp(c · b / τ)

over the bank `b` of kind `q`: a soft maximum of how close `c` is to typical queries (the
inverted softmax of Smith et al. 2017 with a bank of training queries, as in Bogolin et al.'s
query-bank normalization, 2022). `center_q`, the mean of `h_q` over the other bank, keeps
scores near plain cosines. The penalty depends on the candidate alone, so the indexer computes
it once per item and search adds it to the scores of the nearest candidates.

Only candidates of another modality than the bank get a penalty: a text candidate is scored
against text and speech queries, an image candidate against image queries, by plain cosine.
Within a modality, closeness to the bank says how common the content is, not that the item is
a cross-modal hub; penalizing it cost speech→text R@1 2.4 points on the dev split, while every
cross-modal direction gained (data/models/default/MODEL_CARD.md).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModelError, QueryError

HUBNESS_FILE = "hubness.safetensors"
KINDS = ("text", "image")  # the two banks; column order of `HubBank.penalty`
QUERY_BANK = {"text": 0, "speech": 0, "image": 1}  # query modality → penalty column
CANDIDATE_MODALITIES = ("image", "speech", "text")
CHUNK = 4096  # candidates scored against a bank at once


def penalty_column(query_kind: str) -> int:
    """The column of `HubBank.penalty` for queries of `query_kind` ("text", "speech", "image")."""
    try:
        return QUERY_BANK[query_kind]
    except KeyError:
        raise QueryError(
            f"unknown query kind {query_kind!r}; choose from {sorted(QUERY_BANK)}"
        ) from None


def soft_max_similarity(vectors: np.ndarray, bank: np.ndarray, tau: float) -> np.ndarray:
    """`(n,)` float64: τ · log mean_b exp(v · b / τ) for each row v of `vectors`."""
    out = np.empty(len(vectors), dtype=np.float64)
    for s in range(0, len(vectors), CHUNK):
        sims = (vectors[s : s + CHUNK] @ bank.T).astype(np.float64) / tau
        top = sims.max(axis=1, keepdims=True)
        out[s : s + CHUNK] = tau * (np.log(np.exp(sims - top).mean(axis=1)) + top[:, 0])
    return out


@dataclass(frozen=True)
class HubBank:
    """The query banks of a model, with the correction's strength."""

    text: np.ndarray  # (n_text, dim) float32, unit rows: training caption vectors
    image: np.ndarray  # (n_image, dim) float32, unit rows: training photo vectors
    tau: float  # softness of the maximum
    beta: float  # weight of the penalty
    center: tuple[float, float]  # subtracted from h per bank (KINDS order)

    @classmethod
    def build(cls, text: np.ndarray, image: np.ndarray, *, tau: float, beta: float) -> HubBank:
        """Banks from caption and photo vectors; each center is the bank's mean h over the
        other bank (a typical cross-modal candidate gets no penalty on average)."""
        # rounded as the bundle stores them, so a saved bank scores exactly as the built one
        text = np.asarray(text, dtype=np.float16).astype(np.float32)
        image = np.asarray(image, dtype=np.float16).astype(np.float32)
        if text.ndim != 2 or image.ndim != 2 or text.shape[1] != image.shape[1]:
            raise ModelError(
                f"hubness banks must be (n, dim) alike, got {text.shape}, {image.shape}"
            )
        if not len(text) or not len(image):
            raise ModelError("hubness banks must not be empty")
        if tau <= 0 or beta < 0:
            raise ModelError(f"hubness needs tau > 0 and beta >= 0, got {tau}, {beta}")
        center = (
            float(soft_max_similarity(image, text, tau).mean()),
            float(soft_max_similarity(text, image, tau).mean()),
        )
        return cls(text, image, float(tau), float(beta), center)

    def penalty(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        """`(n, 2)` float32: what to subtract from the cosines of candidates of `modality`
        ("image", "speech", "text"), for text (and speech) queries in column 0 and image
        queries in column 1 (`penalty_column`); 0 where the bank is of the candidates' own
        modality."""
        if modality not in CANDIDATE_MODALITIES:
            raise QueryError(f"unknown modality {modality!r}; choose from {CANDIDATE_MODALITIES}")
        vectors = np.asarray(vectors, dtype=np.float32)
        cols = [
            self.beta * (soft_max_similarity(vectors, bank, self.tau) - center)
            if kind != modality
            else np.zeros(len(vectors))
            for kind, bank, center in zip(KINDS, (self.text, self.image), self.center, strict=True)
        ]
        return np.stack(cols, axis=1).astype(np.float32)

    def save(self, bundle_dir: str | Path) -> None:
        """Write `hubness.safetensors`: the float16 banks and the centers (tau and beta live
        in `config.json`, `engine.config.HubnessConfig`)."""
        import torch
        from safetensors.torch import save_file

        tensors = {
            "text": torch.from_numpy(self.text).half(),
            "image": torch.from_numpy(self.image).half(),
            "center": torch.tensor(self.center, dtype=torch.float64),
        }
        path = Path(bundle_dir) / HUBNESS_FILE
        save_file(tensors, str(path))
        # safetensors writes files 0600 (safetensors#782): give it the config's mode, so
        # whoever can read the bundle can load it
        config = Path(bundle_dir) / "config.json"
        if config.exists():
            os.chmod(path, stat.S_IMODE(config.stat().st_mode))

    @classmethod
    def load(cls, bundle_dir: str | Path, *, dim: int, tau: float, beta: float) -> HubBank:
        from safetensors.numpy import load_file

        path = Path(bundle_dir) / HUBNESS_FILE
        try:
            tensors = load_file(str(path))
            text, image = tensors["text"], tensors["image"]
            c_text, c_image = (float(x) for x in tensors["center"])
        except FileNotFoundError as exc:
            raise ModelError(f"{path} is missing but config.json asks for hubness") from exc
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{path} is malformed: {exc}") from exc
        if text.ndim != 2 or image.ndim != 2 or text.shape[1] != dim or image.shape[1] != dim:
            raise ModelError(f"{path}: banks {text.shape}, {image.shape} are not (n, {dim})")
        return cls(text.astype(np.float32), image.astype(np.float32), tau, beta, (c_text, c_image))
