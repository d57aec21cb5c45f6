"""Hubness correction: candidates that sit close to every query are pushed down.

In a learned space some items ("hubs") are near many queries and win top ranks they do not
deserve, while others are hardly ever found. A model bundle may carry two banks of typical
queries from its training data: caption vectors (how text and speech queries look) and photo
vectors (how image queries look). A candidate `c` is then scored against a query of kind `q`
as

    score = cos(query, c) − β · (h_q(c) − center_q),   h_q(c) = τ · log Σ_b w_b exp(c · b / τ)

over the bank rows `b` (weights `w_b`, summing to 1) of kind `q`: a soft maximum of how close
`c` is to typical queries (the inverted softmax of Smith et al. 2017 with a bank of training
queries, as in Bogolin et al.'s query-bank normalization, 2022). A bank row is the mean of a
k-means cluster of training vectors, weighted by its share of them, so the bundle carries no
vector of any single training caption or photo (`trainer.hubness`). `center_q`, the weighted
mean of `h_q` over the other bank, keeps scores near plain cosines. The penalty depends on the candidate alone, so the indexer computes
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


def soft_max_similarity(
    vectors: np.ndarray, bank: np.ndarray, log_weight: np.ndarray, tau: float
) -> np.ndarray:
    """`(n,)` float64: τ · log Σ_b w_b exp(v · b / τ) for each row v of `vectors`."""
    out = np.empty(len(vectors), dtype=np.float64)
    for s in range(0, len(vectors), CHUNK):
        sims = (vectors[s : s + CHUNK] @ bank.T).astype(np.float64) / tau + log_weight
        top = sims.max(axis=1, keepdims=True)
        out[s : s + CHUNK] = tau * (np.log(np.exp(sims - top).sum(axis=1)) + top[:, 0])
    return out


def _checked_bank(rows: np.ndarray, weight: np.ndarray | None, name: str) -> tuple:
    rows = np.asarray(rows, dtype=np.float16).astype(np.float32)  # as the bundle stores them
    if rows.ndim != 2 or not len(rows):
        raise ModelError(f"the {name} bank must be a non-empty (n, dim) array, not {rows.shape}")
    weight = np.ones(len(rows)) if weight is None else np.asarray(weight, dtype=np.float64)
    if weight.shape != (len(rows),) or not (weight > 0).all() or not np.isfinite(weight).all():
        raise ModelError(f"the {name} bank needs one positive weight per row")
    return rows, np.log(weight / weight.sum())


@dataclass(frozen=True)
class HubBank:
    """The query banks of a model, with the correction's strength."""

    text: np.ndarray  # (n_text, dim) float32: caption cluster means (text/speech queries)
    image: np.ndarray  # (n_image, dim) float32: photo cluster means (image queries)
    text_log_weight: np.ndarray  # (n_text,) float64, log of each row's share
    image_log_weight: np.ndarray  # (n_image,) float64
    tau: float  # softness of the maximum
    beta: float  # weight of the penalty
    center: tuple[float, float]  # subtracted from h per bank (KINDS order)

    @classmethod
    def build(
        cls,
        text: np.ndarray,
        image: np.ndarray,
        *,
        tau: float,
        beta: float,
        text_weight: np.ndarray | None = None,
        image_weight: np.ndarray | None = None,
    ) -> HubBank:
        """Banks from caption and photo rows with positive weights (default: equal); each
        center is the bank's weighted mean h over the other bank, so a typical cross-modal
        candidate gets no penalty on average. Rows are rounded to float16 as saved."""
        text, text_lw = _checked_bank(text, text_weight, "text")
        image, image_lw = _checked_bank(image, image_weight, "image")
        if text.shape[1] != image.shape[1]:
            raise ModelError(f"hubness banks must be alike, got {text.shape}, {image.shape}")
        if tau <= 0 or beta < 0:
            raise ModelError(f"hubness needs tau > 0 and beta >= 0, got {tau}, {beta}")
        center = (
            float(np.exp(image_lw) @ soft_max_similarity(image, text, text_lw, tau)),
            float(np.exp(text_lw) @ soft_max_similarity(text, image, image_lw, tau)),
        )
        return cls(text, image, text_lw, image_lw, float(tau), float(beta), center)

    def penalty(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        """`(n, 2)` float32: what to subtract from the cosines of candidates of `modality`
        ("image", "speech", "text"), for text (and speech) queries in column 0 and image
        queries in column 1 (`penalty_column`); 0 where the bank is of the candidates' own
        modality."""
        if modality not in CANDIDATE_MODALITIES:
            raise QueryError(f"unknown modality {modality!r}; choose from {CANDIDATE_MODALITIES}")
        vectors = np.asarray(vectors, dtype=np.float32)
        banks = ((self.text, self.text_log_weight), (self.image, self.image_log_weight))
        cols = [
            self.beta * (soft_max_similarity(vectors, bank, lw, self.tau) - center)
            if kind != modality
            else np.zeros(len(vectors))
            for kind, (bank, lw), center in zip(KINDS, banks, self.center, strict=True)
        ]
        return np.stack(cols, axis=1).astype(np.float32)

    def save(self, bundle_dir: str | Path) -> None:
        """Write `hubness.safetensors`: the float16 banks, their weights and the centers (tau
        and beta live in `config.json`, `engine.config.HubnessConfig`)."""
        import torch
        from safetensors.torch import save_file

        tensors = {
            "text": torch.from_numpy(self.text).half(),
            "image": torch.from_numpy(self.image).half(),
            "text_weight": torch.from_numpy(np.exp(self.text_log_weight)),
            "image_weight": torch.from_numpy(np.exp(self.image_log_weight)),
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
            t = load_file(str(path))
            text, text_lw = _checked_bank(t["text"], t["text_weight"], "text")
            image, image_lw = _checked_bank(t["image"], t["image_weight"], "image")
            c_text, c_image = (float(x) for x in t["center"])
        except FileNotFoundError as exc:
            raise ModelError(f"{path} is missing but config.json asks for hubness") from exc
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{path} is malformed: {exc}") from exc
        if text.shape[1] != dim or image.shape[1] != dim:
            raise ModelError(f"{path}: banks {text.shape}, {image.shape} are not (n, {dim})")
        return cls(text, image, text_lw, image_lw, tau, beta, (c_text, c_image))
